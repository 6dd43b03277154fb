"""Choosing a tile size from a memory budget: :func:`plan_tiles`.

The memory model is deliberately simple. The peak activation memory of one inference call (no autograd) of
a network over a ``(B, C, h, w)`` latent is taken as

    bytes = fixed_bytes + B * (bytes_per_element * constant * channels * pixels_per_latent * h * w
                               + SCORE_BYTES * scores * (h * w) ** 2)

- The linear term: ``channels`` is the network's base width (UNet ``model_channels``; first-stage ``ch``),
  ``pixels_per_latent`` is 1 for the UNet and ``f ** 2`` for the first stage, which works at image
  resolution. Everything else about the architecture (channel multipliers, skip connections kept alive
  until the decoder half, the working set of the widest block, allocator slack) is folded into one
  ``constant`` per kind of network.
- The quadratic term: attention whose score matrix is materialised -- SDPA's math kernel, which PyTorch
  picks for the first stage's single-head mid-block attention (head width 512) and for the UNet's
  ``AttentionBlock`` (LDM-zoo models without spatial transformers); the spatial transformers of SD /
  layout / text models run in a memory-efficient kernel and add nothing. ``scores`` is the largest
  ``heads * tokens ** 2 / (h * w) ** 2`` of one attention call, computed from the config.
- ``fixed_bytes``: what a call needs whatever its size (cuDNN workspaces, allocator rounding).

The constants were measured once (``bench/tiling_memory.py``) on an NVIDIA H100 80GB (PyTorch 2.11,
CUDA 13), random weights, batch 1, fp16 and fp32, latent sides 32 / 64 / 128, as
``torch.cuda.max_memory_allocated`` during the call minus what was allocated before it. Fitting
``fixed + linear`` on sides 64 and 128 gave UNet linear constants of 15-18 (bsr_sr), 16-25
(semantic_synthesis256), 14-19 (layout2img), 25 (SD 1.x) and fixed parts up to 64 MiB (85 MiB for SD 1.x
at side 32); first-stage
decoders 8.5-12.5, encoders 7.0-7.5; materialised attention 9.4-9.9 bytes per score (celebahq256's UNet:
2.1 GB at a 128x128 latent; the first stages' mid attention: 2.5 GB at 128x128). The constants below are
those maxima rounded up. Against the 54 measurements the estimate is 1.06-9.4x the measured peak
(median 2.1; the largest ratios at side 32, where the fixed part dominates): conservative, as the sum of
the linear and attention terms where the real peak is nearer their maximum. On other devices (CPU, MPS)
the same model is used as an estimate; the planner only runs when a budget is known.

:func:`plan_tiles` solves for the largest window area that fits the budget and takes the most square
window of that area whose sides are multiples of ``align``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldm_sdk.tiling.grid import TileGrid

if TYPE_CHECKING:
    from ldm_sdk.models.configs import DDConfig, UNetConfig

#: peak activation elements per (latent pixel x UNet ``model_channels``) of one UNet call
UNET_CONSTANT = 28.0
#: peak activation elements per (image pixel x first-stage ``ch``) of one first-stage decode
DECODER_CONSTANT = 13.0
#: peak activation elements per (image pixel x first-stage ``ch``) of one first-stage encode
ENCODER_CONSTANT = 8.0
#: bytes per materialised attention score (fp32 scores and their softmax, whatever the dtype)
SCORE_BYTES = 10.0
#: bytes a call needs whatever its size
FIXED_BYTES = 96 * 2**20


@dataclass(frozen=True)
class ActivationModel:
    """Peak activation memory of one network call, as a function of the latent size (see the module doc)."""

    constant: float
    channels: int
    pixels_per_latent: int = 1
    scores: float = 0.0
    fixed_bytes: int = 0

    def __post_init__(self) -> None:
        if self.constant <= 0 or self.channels < 1 or self.pixels_per_latent < 1:
            raise ValueError(f"invalid activation model {self}: constant, channels and pixels must be > 0")
        if self.scores < 0 or self.fixed_bytes < 0:
            raise ValueError(f"invalid activation model {self}: scores and fixed_bytes must be >= 0")

    @classmethod
    def for_unet(cls, config: UNetConfig) -> ActivationModel:
        """A CompVis UNet; ``AttentionBlock`` levels (no spatial transformer) add materialised scores."""
        scores = 0.0
        if not config.use_spatial_transformer:
            levels = len(config.channel_mult)
            attended = {i for i in range(levels) if 2**i in tuple(config.attention_resolutions)}
            attended.add(levels - 1)  # the middle block always attends
            for level in attended:
                width = config.model_channels * config.channel_mult[level]
                heads = (
                    config.num_heads if config.num_head_channels == -1 else width // config.num_head_channels
                )
                scores = max(scores, heads / 16.0**level)  # tokens = h w / 4**level
        return cls(UNET_CONSTANT, config.model_channels, 1, scores, FIXED_BYTES)

    @classmethod
    def for_decoder(cls, ddconfig: DDConfig) -> ActivationModel:
        """A first-stage decoder; its single-head mid-block attention over the latent adds scores."""
        return cls(
            DECODER_CONSTANT, ddconfig.ch, ddconfig.downsampling_factor**2, _mid_scores(ddconfig), FIXED_BYTES
        )

    @classmethod
    def for_encoder(cls, ddconfig: DDConfig) -> ActivationModel:
        """A first-stage encoder, sized by the latent it produces (its image is ``f`` times larger)."""
        return cls(
            ENCODER_CONSTANT, ddconfig.ch, ddconfig.downsampling_factor**2, _mid_scores(ddconfig), FIXED_BYTES
        )

    def bytes(self, batch: int, height: int, width: int, bytes_per_element: int) -> int:
        """Estimated peak bytes of one call over a ``batch x height x width`` latent."""
        area = float(height) * float(width)
        linear = bytes_per_element * self.constant * self.channels * self.pixels_per_latent * area
        return math.ceil(self.fixed_bytes + batch * (linear + SCORE_BYTES * self.scores * area * area))

    def max_area(self, batch: int, bytes_per_element: int, budget_bytes: int) -> float:
        """The largest latent area (pixels) whose estimate fits ``budget_bytes`` (0 when none does)."""
        per_item = (budget_bytes - self.fixed_bytes) / batch
        if per_item <= 0:
            return 0.0
        a = bytes_per_element * self.constant * self.channels * self.pixels_per_latent
        q = SCORE_BYTES * self.scores
        if q == 0:
            return per_item / a
        return (-a + math.sqrt(a * a + 4 * q * per_item)) / (2 * q)  # q x^2 + a x = per_item


def _mid_scores(ddconfig: DDConfig) -> float:
    """One head over every latent pixel in the mid block (attn_type "vanilla"): ``(h w) ** 2`` scores."""
    return 1.0 if ddconfig.attn_type == "vanilla" else 0.0


@dataclass(frozen=True)
class TilePlan:
    """What :func:`plan_tiles` chose: ``tile`` ``(h, w)`` in latent pixels, or None when the whole latent
    fits; the ``overlap``; how many ``windows`` that makes; the estimated peak bytes of one call."""

    tile: tuple[int, int] | None
    overlap: int
    windows: int
    estimated_bytes: int

    @property
    def tiled(self) -> bool:
        return self.tile is not None


def plan_tiles(
    shape: tuple[int, ...] | torch.Size,
    bytes_per_element: int,
    budget_bytes: int | None,
    *,
    model: ActivationModel,
    align: int = 1,
    overlap: int | None = None,
    min_tile: int | None = None,
) -> TilePlan:
    """The window size for a latent of ``shape`` ``(B, C, h, w)`` so one call fits ``budget_bytes``.

    ``budget_bytes`` None means no limit (never tiled). ``align``: window sides are multiples of it (the
    UNet's resampling factor). ``overlap`` defaults to a quarter of the window side (at least ``align``)
    and is capped at half of it, so windows always advance by at least half their side.
    ``min_tile`` (default ``max(2 * align, 8)``): below it the budget is refused with an error saying how
    much memory the smallest window needs.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be the latent's (B, C, h, w); got {tuple(shape)}")
    batch, _, height, width = (int(v) for v in shape)
    if min(batch, height, width) < 1 or bytes_per_element < 1:
        raise ValueError(f"cannot plan tiles for shape {tuple(shape)} at {bytes_per_element} bytes/element")
    full = model.bytes(batch, height, width, bytes_per_element)
    if budget_bytes is None or full <= budget_bytes:
        return TilePlan(None, 0, 1, full)
    if budget_bytes <= 0:
        raise ValueError(f"the memory budget must be positive, got {budget_bytes} bytes")
    smallest = max(min_tile if min_tile is not None else max(2 * align, 8), align)
    smallest = math.ceil(smallest / align) * align
    area = model.max_area(batch, bytes_per_element, budget_bytes)
    th = min(height, int(math.sqrt(area)) // align * align)
    tw = min(width, int(area / max(th, 1)) // align * align) if th >= align else 0
    if th < min(smallest, height) or tw < min(smallest, width):
        need = model.bytes(batch, min(smallest, height), min(smallest, width), bytes_per_element)
        raise ValueError(
            f"a memory budget of {_mib(budget_bytes)} does not fit even a {smallest}x{smallest} latent "
            f"window at batch {batch} ({_mib(need)} estimated); give at least that much, a smaller "
            "batch, or a lower-precision dtype"
        )
    if overlap is None:
        overlap = max(align, min(th, tw) // 4)
    overlap = max(0, min(overlap, min(th, tw) // 2, min(th, tw) - align))
    grid = TileGrid.cover(height, width, (th, tw), overlap, align=align)
    return TilePlan((th, tw), overlap, len(grid), model.bytes(batch, th, tw, bytes_per_element))


def available_accelerator_bytes(device: torch.device | str, fraction: float = 0.8) -> int | None:
    """A budget from the device's free memory: ``fraction`` of what CUDA reports free plus what PyTorch's
    allocator holds unused; None on other devices (no automatic budget there)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(fraction * (free + cached))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


__all__ = [
    "DECODER_CONSTANT",
    "ENCODER_CONSTANT",
    "UNET_CONSTANT",
    "ActivationModel",
    "TilePlan",
    "available_accelerator_bytes",
    "plan_tiles",
]
