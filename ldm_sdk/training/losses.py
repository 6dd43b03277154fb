"""The first stage's training loss: reconstruction + perceptual + patch GAN + KL or VQ codebook terms.

It follows CompVis ``LPIPSWithDiscriminator`` (KL autoencoders) and taming's ``VQLPIPSWithDiscriminator``
(VQ autoencoders). Generator (autoencoder) step, ``x`` the input and ``x'`` the reconstruction::

    rec      = pixel_weight * |x - x'|  (or (x - x')^2)  + perceptual_weight * LPIPS(x, x')   per pixel
    KL: nll  = sum(rec / exp(logvar) + logvar) / B         VQ: nll = mean(rec)
    g        = -mean(D(x'))
    w_adapt  = ||grad_L nll|| / (||grad_L g|| + 1e-4), clamped to [0, 1e4], times disc_weight
               (L = the decoder's last layer, ``decoder.conv_out.weight``; Esser et al. 2021, Eq. 7)
    f        = disc_factor once step >= disc_start, else 0          (``adopt_weight``)
    KL: loss = nll + kl_weight * sum(KL(q(z|x) || N(0, I))) / B + w_adapt * f * g
    VQ: loss = nll + codebook_weight * vq_loss + w_adapt * f * g

Discriminator step: ``f * d_loss(D(x), D(sg[x']))`` with the hinge ``0.5 (mean relu(1 - real) + mean
relu(1 + fake))`` or the vanilla ``0.5 (mean softplus(-real) + mean softplus(fake))`` loss.

Submodule names are the originals' (``discriminator.main.*``, ``perceptual_loss.*``, ``logvar``), so the
module's state dict is the ``loss.*`` part of a CompVis autoencoder checkpoint (which ``ldm_sdk.load`` skips).
Deviations: before ``disc_start`` the generator step skips the discriminator and the adaptive weight (their
term is multiplied by 0 there); ``pixel_weight`` is applied (the originals accept and ignore it; default 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.models.first_stage import DiagonalGaussianDistribution
from ldm_sdk.training.discriminator import NLayerDiscriminator, weights_init
from ldm_sdk.training.lpips import LPIPS

DiscLoss = Literal["hinge", "vanilla"]
PixelLoss = Literal["l1", "l2"]


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from ``threshold`` on, ``value`` before (taming)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def pixel_loss(inputs: Tensor, reconstructions: Tensor, kind: PixelLoss = "l1") -> Tensor:
    """Per-pixel reconstruction error (not reduced)."""
    diff = inputs.contiguous() - reconstructions.contiguous()
    if kind == "l1":
        return diff.abs()
    if kind == "l2":
        return diff.pow(2)
    raise ValueError(f"unknown pixel loss {kind!r}; valid: l1, l2")


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0) -> Tensor:
    """``||grad nll|| / (||grad g|| + 1e-4)`` at ``last_layer``, clamped to [0, 1e4], detached, times
    ``disc_weight`` (taming ``calculate_adaptive_weight``). Both losses keep their graphs."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


def kl_loss(posterior: DiagonalGaussianDistribution) -> Tensor:
    """``sum(KL(q(z|x) || N(0, I))) / B``."""
    kl = posterior.kl()
    return torch.sum(kl) / kl.shape[0]


class AutoencoderLoss(nn.Module):
    """Loss of a KL (``kind="kl"``) or VQ (``kind="vq"``) first stage; see the module docstring.

    ``perceptual``: an :class:`~ldm_sdk.training.lpips.LPIPS` module or None (no perceptual term; see
    :func:`~ldm_sdk.training.lpips.build_perceptual_loss` for when that happens).
    """

    def __init__(
        self,
        kind: Literal["kl", "vq"],
        *,
        disc_start: int = 50001,
        perceptual: LPIPS | None = None,
        perceptual_weight: float = 1.0,
        pixel_weight: float = 1.0,
        pixel: PixelLoss = "l1",
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        logvar_init: float = 0.0,
        disc_in_channels: int = 3,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_factor: float = 1.0,
        disc_weight: float = 0.5,
        disc_loss: DiscLoss = "hinge",
        use_actnorm: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("kl", "vq"):
            raise ValueError(f"unknown autoencoder kind {kind!r}; valid: kl, vq")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"unknown discriminator loss {disc_loss!r}; valid: {', '.join(D_LOSSES)}")
        if pixel not in ("l1", "l2"):
            raise ValueError(f"unknown pixel loss {pixel!r}; valid: l1, l2")
        self.kind = kind
        self.perceptual_loss = perceptual
        self.perceptual_weight = perceptual_weight if perceptual is not None else 0.0
        self.pixel_weight = pixel_weight
        self.pixel = pixel
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        if kind == "kl":  # CompVis: an output log-variance (not in the generator's optimizer: stays at init)
            self.logvar = nn.Parameter(torch.ones(()) * logvar_init)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.discriminator.apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_loss_name = disc_loss

    def disc_factor_at(self, global_step: int) -> float:
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)

    def _rec(self, inputs: Tensor, reconstructions: Tensor) -> tuple[Tensor, Tensor]:
        rec = self.pixel_weight * pixel_loss(inputs, reconstructions, self.pixel)
        p_loss = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())
            rec = rec + self.perceptual_weight * p_loss
        return rec, p_loss

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        global_step: int,
        last_layer: Tensor,
        *,
        posterior: DiagonalGaussianDistribution | None = None,
        codebook_loss: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss (optimizer 0) and its log values (CompVis names, without ``train/``)."""
        rec, p_loss = self._rec(inputs, reconstructions)
        logs: dict[str, Tensor] = {"rec_loss": rec.detach().mean(), "p_loss": p_loss.detach().mean()}
        if self.kind == "kl":
            if posterior is None:
                raise ValueError("a KL autoencoder's loss needs the posterior")
            nll_per = rec / torch.exp(self.logvar) + self.logvar
            nll = torch.sum(nll_per) / nll_per.shape[0]
            kl = kl_loss(posterior)
            loss = nll + self.kl_weight * kl
            logs.update(kl_loss=kl.detach(), logvar=self.logvar.detach())
        else:
            if codebook_loss is None:
                raise ValueError("a VQ autoencoder's loss needs the quantizer's codebook loss")
            nll = torch.mean(rec)
            loss = nll + self.codebook_weight * codebook_loss.mean()
            logs["quant_loss"] = codebook_loss.detach().mean()
        factor = self.disc_factor_at(global_step)
        d_weight = torch.zeros((), device=inputs.device)
        g_loss = torch.zeros((), device=inputs.device)
        if factor > 0:
            g_loss = -torch.mean(self.discriminator(reconstructions.contiguous()))
            if self.training and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.discriminator_weight)
            loss = loss + d_weight * factor * g_loss
        logs.update(
            nll_loss=nll.detach(),
            g_loss=g_loss.detach(),
            d_weight=d_weight.detach(),
            disc_factor=torch.tensor(factor),
            total_loss=loss.detach(),
        )
        return loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss (optimizer 1) on the real inputs and detached reconstructions."""
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        factor = self.disc_factor_at(global_step)
        d_loss = factor * D_LOSSES[self.disc_loss_name](logits_real, logits_fake)
        return d_loss, {
            "disc_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


__all__ = [
    "D_LOSSES",
    "AutoencoderLoss",
    "adaptive_weight",
    "adopt_weight",
    "hinge_d_loss",
    "kl_loss",
    "pixel_loss",
    "vanilla_d_loss",
]
