"""One LDM training step's model side: what the optimizer trains (and DDP wraps), and its random draws.

:class:`LatentDiffusionStep` holds the trained parts of CompVis ``LatentDiffusion`` - the
``DiffusionWrapper`` (``model``), a jointly trained condition encoder (``cond_stage_model``) and the learned
``logvar`` - and computes ``p_losses`` (:func:`ldm_sdk.diffusion.objective.diffusion_loss`) on latents.
A frozen encoder (CLIP, MiniLM, a concat map) is run outside it, without gradients, and its output handed
in. Condition dropout for classifier-free guidance replaces a sample's condition by the encoder's
``unconditional()`` output with probability ``p`` (for a trainable encoder the null embedding learns).

A ``hybrid`` model (Stable Diffusion inpainting) takes a second, concatenated part: the ``concat`` map
(mask + masked-image latent), computed outside the step by a weight-free encoder and handed in. Dropout
never touches it: like SD-inpainting training, a dropped sample keeps its mask and masked image and loses
only its text, which is exactly what the sampler's unconditional half sees (``uc_full`` of the SD scripts:
the same ``c_concat``, the empty prompt).

Every random draw of a step (timesteps, noise, dropout, the KL posterior sample) is drawn for the GLOBAL
batch from a generator all ranks share, and each rank takes its own rows (``rank::world_size``, the
positions ``DistributedSampler`` gives it). So the training of N processes equals one process on the same
global batch, up to floating-point reduction order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.objective import diffusion_loss
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.encoders.base import ConditionEncoder
from ldm_sdk.models.configs import DiffusionConfig
from ldm_sdk.training.distributed import DistInfo


class SharedDraws:
    """Global-batch random draws from one generator (same seed and state on every rank), sliced per rank."""

    def __init__(self, generator: torch.Generator, info: DistInfo) -> None:
        self.generator, self.info = generator, info

    def _mine(self, t: Tensor) -> Tensor:
        return t[self.info.rank :: self.info.world_size]

    def randn(self, local_shape: tuple[int, ...], device: torch.device) -> Tensor:
        shape = (local_shape[0] * self.info.world_size, *local_shape[1:])
        out = torch.randn(shape, generator=self.generator, device=self.generator.device)
        return self._mine(out).to(device)

    def randint(self, high: int, local_batch: int, device: torch.device) -> Tensor:
        out = torch.randint(
            0,
            high,
            (local_batch * self.info.world_size,),
            generator=self.generator,
            device=self.generator.device,
        )
        return self._mine(out).to(device)

    def bernoulli(self, p: float, local_batch: int, device: torch.device) -> Tensor:
        u = torch.rand(
            (local_batch * self.info.world_size,), generator=self.generator, device=self.generator.device
        )
        return self._mine(u < p).to(device)


def drop_conditions(cond: Tensor, uncond: Tensor, drop: Tensor) -> Tensor:
    """``cond`` with the rows where ``drop`` is true replaced by ``uncond`` (broadcast over the rest)."""
    if uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"unconditional output {tuple(uncond.shape)} does not match the condition {tuple(cond.shape)}"
        )
    mask = drop.view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(mask, uncond.to(cond.dtype).expand_as(cond), cond)


class LatentDiffusionStep(nn.Module):
    """``forward(z, cond_input, t, noise, drop, concat) -> (loss, logs)`` for clean (scaled) latents ``z``.

    ``encoder``: the condition encoder when it trains jointly (its output is computed here, inside the
    autograd graph and DDP's reducer); None for an unconditional model or a frozen encoder, whose output is
    then ``cond_input``. ``concat``: the hybrid model's concat map (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: DiffusionSchedule,
        config: DiffusionConfig,
        *,
        encoder: ConditionEncoder | None = None,
        wrap: Callable[[Tensor], Conditioning] | None = None,
        logvar: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.config = config
        self.cond_stage_model = encoder
        self.wrap = wrap if wrap is not None else (encoder.conditioning if encoder is not None else None)
        self.logvar = logvar

    def encode(
        self, cond_input: Any, drop: Tensor | None, batch: int, concat: Tensor | None = None
    ) -> Conditioning:
        """The step's conditioning: the encoder's part (``drop`` rows made unconditional) plus, for a
        hybrid model, the ``concat`` map as it is (never dropped)."""
        if self.wrap is None:
            return Conditioning(concat=concat)
        c = self.cond_stage_model(cond_input) if self.cond_stage_model is not None else cond_input
        if drop is not None and bool(drop.any()):
            source = self.cond_stage_model
            if source is None:
                raise ValueError("condition dropout of a frozen encoder is applied before the step")
            c = drop_conditions(c, source.unconditional(batch), drop)
        cond = self.wrap(c)
        if concat is None:
            return cond
        if cond.concat is not None:
            raise ValueError("the encoder gives a concat map already; a hybrid model takes one concat part")
        return cond.with_concat(concat)

    def forward(
        self,
        z: Tensor,
        cond_input: Any,
        t: Tensor,
        noise: Tensor,
        drop: Tensor | None = None,
        concat: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cond = self.encode(cond_input, drop, z.shape[0], concat)
        logvar = self.logvar if self.logvar is not None else None
        return diffusion_loss(self.model, self.schedule, z, cond, t, noise, self.config, logvar)


@torch.no_grad()
def scale_from_std(z: Tensor, info: DistInfo) -> float:
    """CompVis ``scale_by_std``: ``1 / std`` (unbiased) of all elements of ``z`` over every rank (float64
    sums), rounded to float32 as CompVis keeps ``scale_factor`` in a float32 buffer."""
    z = z.detach().double().flatten()
    count = torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device)
    stats = torch.stack([count, z.sum(), (z * z).sum()])
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(stats)
    n, s, ss = (float(v) for v in stats.tolist())
    if n < 2:
        raise ValueError("scale_by_std needs at least two latent values")
    std = ((ss - s * s / n) / (n - 1)) ** 0.5
    if not std > 0:
        raise ValueError("scale_by_std: the first batch's latents are constant (std 0)")
    return float(torch.tensor(1.0 / std, dtype=torch.float32))


__all__ = ["LatentDiffusionStep", "SharedDraws", "drop_conditions", "scale_from_std"]
