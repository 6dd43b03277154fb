"""First-stage autoencoders of LDM: KL-regularised (``AutoencoderKL``) and vector-quantised (``VQModel``).

Names follow CompVis ``ldm.models.autoencoder`` (``encoder``, ``decoder``, ``quant_conv``,
``post_quant_conv``, ``quantize``), so the ``first_stage_model.*`` part of an original checkpoint loads
strictly once the prefix is stripped. The training losses (``loss.*`` keys of a standalone autoencoder
checkpoint: LPIPS + discriminator) are not part of these modules.

``VQModel`` is the original ``VQModelInterface``, the form LDM uses: the quantiser is part of the decoder,
so ``encode`` returns the pre-quantisation latent and ``decode`` quantises it first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike

import torch
from torch import Tensor, nn

from ldm_sdk.models.autoencoder import Decoder, Encoder
from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, VQModelConfig
from ldm_sdk.models.quantize import QuantizerInfo, UnknownIndex, VectorQuantizer


def _ddconfig(ddconfig: DDConfig | Mapping[str, object]) -> DDConfig:
    return ddconfig if isinstance(ddconfig, DDConfig) else DDConfig.model_validate(dict(ddconfig))


class DiagonalGaussianDistribution:
    """``N(mean, diag(exp(logvar)))`` from ``parameters = cat([mean, logvar], dim=1)``.

    ``logvar`` is clamped to ``[-30, 20]`` as in the original. With ``deterministic`` the std is zero and
    ``kl`` / ``nll`` are zero (one per batch element).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(
                f"parameters must be (b, 2*c, ...) holding mean and logvar; got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps``; ``eps`` is drawn on the generator's device (then moved there), so a seed
        gives the same sample on every device."""
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def _zeros(self) -> Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over all non-batch dims; ``other`` defaults to ``N(0, I)``."""
        if self.deterministic:
            return self._zeros()
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return self._zeros()
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=tuple(dims)
        )


class _FirstStage(nn.Module):
    """What both autoencoders share: the ``encoder`` / ``decoder`` of ``ddconfig`` (registered first, as in
    CompVis) and ``embed_dim`` latent channels."""

    def __init__(self, dd: DDConfig, embed_dim: int) -> None:
        super().__init__()
        self.ddconfig = dd
        self.embed_dim = embed_dim
        self.encoder = Encoder.from_ddconfig(dd)
        self.decoder = Decoder.from_ddconfig(dd)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.ddconfig.downsampling_factor


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder: ``encode(x)`` gives a :class:`DiagonalGaussianDistribution` over
    ``embed_dim`` latent channels; ``decode(z)`` gives the image."""

    def __init__(self, ddconfig: DDConfig | Mapping[str, object], embed_dim: int) -> None:
        dd = _ddconfig(ddconfig)
        if not dd.double_z:
            raise ValueError(
                "AutoencoderKL needs ddconfig.double_z=True (the encoder outputs mean and logvar)"
            )
        super().__init__(dd, embed_dim)
        self.quant_conv = nn.Conv2d(2 * dd.z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd.z_channels, 1)

    @classmethod
    def from_config(cls, cfg: AutoencoderKLConfig) -> AutoencoderKL:
        if not isinstance(cfg, AutoencoderKLConfig):
            raise TypeError(
                f"AutoencoderKL.from_config takes an AutoencoderKLConfig; got {type(cfg).__name__}"
            )
        return cls(cfg.ddconfig, cfg.embed_dim)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruction and posterior; the latent is a posterior sample, or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(_FirstStage):
    """Vector-quantised autoencoder in LDM's ``VQModelInterface`` form.

    ``encode(x)`` returns the pre-quantisation latent ``quant_conv(encoder(x))`` (``embed_dim`` channels);
    ``decode(h)`` quantises it (unless ``force_not_quantize``), then ``post_quant_conv`` and the decoder.
    """

    def __init__(
        self,
        ddconfig: DDConfig | Mapping[str, object],
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        remap: str | PathLike[str] | None = None,
        unknown_index: UnknownIndex = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        dd = _ddconfig(ddconfig)
        if dd.double_z:
            raise ValueError("VQModel needs ddconfig.double_z=False (the encoder outputs one latent)")
        super().__init__(dd, embed_dim)
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(
            n_embed,
            embed_dim,
            beta=beta,
            remap=remap,
            unknown_index=unknown_index,
            sane_index_shape=sane_index_shape,
            legacy=legacy,
        )
        self.quant_conv = nn.Conv2d(dd.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd.z_channels, 1)

    @classmethod
    def from_config(cls, cfg: VQModelConfig) -> VQModel:
        if not isinstance(cfg, VQModelConfig):
            raise TypeError(f"VQModel.from_config takes a VQModelConfig; got {type(cfg).__name__}")
        return cls(
            cfg.ddconfig,
            n_embed=cfg.n_embed,
            embed_dim=cfg.embed_dim,
            beta=cfg.beta,
            remap=cfg.remap,
            unknown_index=cfg.unknown_index,  # type: ignore[arg-type]  # validated by the quantizer
            sane_index_shape=cfg.sane_index_shape,
            legacy=cfg.legacy,
        )

    def encode(self, x: Tensor) -> Tensor:
        """Pre-quantisation latent ``h = quant_conv(encoder(x))``."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: Tensor, force_not_quantize: bool = False) -> Tensor:
        """Quantise ``h`` to its nearest codebook vectors (straight-through), then decode it."""
        quant = h if force_not_quantize else self.quantize.quantize(h)
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: Tensor, shape: tuple[int, int, int] | None = None) -> Tensor:
        """Decode codebook indices ``(b, h, w)``, or flat ones (``(b, h*w)``, ``(b*h*w,)``) with ``shape``.

        Indices are in the quantizer's numbering (the compact ``used`` one when it has ``remap``).
        """
        if shape is None:
            if indices.ndim != 3:
                raise ValueError(
                    f"indices of shape {tuple(indices.shape)}: pass (b, h, w) indices, or shape=(b, h, w)"
                )
            shape = (indices.shape[0], indices.shape[1], indices.shape[2])
        b, h, w = shape
        if indices.numel() != b * h * w:
            raise ValueError(f"{indices.numel()} indices do not fill shape (b, h, w)={tuple(shape)}")
        quant = self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant, force_not_quantize=True)

    def forward(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, QuantizerInfo]:
        """Reconstruction, VQ loss and the quantizer info ``(None, None, indices)`` (for training)."""
        quant, loss, info = self.quantize(self.encode(x), generator=generator)
        return self.decoder(self.post_quant_conv(quant)), loss, info
