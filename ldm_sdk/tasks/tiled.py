"""What the large-image tasks (upscale, semantic, layout) share: tiling options, the plan, sampling, decoding.

These tasks apply the UNet convolutionally (Rombach et al. 2022, Sec. 4.3.2): a latent larger than the
model was trained on is denoised as a whole, or -- when a window size is asked for or the memory budget
requires it -- as overlapping windows blended by :class:`~ldm_sdk.tiling.TiledDenoiser` (spatial
conditions such as the low-res image or the semantic map are cropped per window). The first stage decodes
the same way (:func:`~ldm_sdk.tiling.tiled_decode`).

Request options (:class:`TiledRequest`), in output-image pixels:

- ``tile``: window side. It must be a multiple of the model's size multiple (latent factor x UNet
  downsampling: 32 for the f4 SR / semantic / layout models). None: automatic -- whole when the estimate of
  :func:`~ldm_sdk.tiling.plan_tiles` fits the budget, else the largest window that does.
- ``overlap``: how far neighbouring windows overlap (a multiple of the latent factor, below ``tile``).
- ``memory_budget_mb``: the activation budget for the automatic choice. None: what the runtime's memory
  budget (``Runtime.create(memory_budget_bytes=...)``) leaves beside the loaded models, and on CUDA at most
  80% of the free memory; with neither, no limit (CPU RAM is not probed).

The plan is recorded in the manifest's ``extra["tiling"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from ldm_sdk.tasks.base import TaskError, TaskRequest

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.diffusion.denoiser import Denoiser
    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.tasks.runner import Guided, Run
    from ldm_sdk.tiling import TiledDenoiser

__all__ = [
    "TiledRequest",
    "Tiling",
    "activation_budget",
    "check_concat",
    "concat_conditioning",
    "concat_encoder",
    "decode_latents",
    "plan_tiling",
    "refuse_guidance",
    "render",
    "sample_latents",
    "unet_align",
]

#: latent pixels of neighbour context each first-stage window decodes with (cropped before blending)
DECODE_CONTEXT = 4


class TiledRequest(TaskRequest):
    """A task request with the tiling options of the large-image tasks (see the module doc)."""

    tile: int | None = Field(None, ge=8, le=16384)
    overlap: int = Field(64, ge=0, le=8192)
    memory_budget_mb: int | None = Field(None, ge=1, le=2**24)


@dataclass(frozen=True)
class Tiling:
    """Windows for the UNet and for the first-stage decode, in latent pixels (``None``: whole).

    ``source``: ``"request"`` (the request's ``tile``), ``"budget"`` (chosen to fit ``budget_bytes``)
    or ``"whole"`` (no tiling needed or possible to decide).
    """

    unet_tile: tuple[int, int] | None
    unet_overlap: int
    decode_tile: tuple[int, int] | None
    decode_overlap: int
    align: int
    source: Literal["request", "budget", "whole"]
    budget_bytes: int | None = None

    def record(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def unet_align(bundle: ModelBundle) -> int:
    """``2 ** (levels - 1)``: what latent sides (and window sides) must be multiples of for the UNet."""
    unet = bundle.config.unet
    return 2 ** (len(unet.channel_mult) - 1) if unet is not None else 1


def plan_tiling(run: Run, request: TiledRequest, latent_hw: tuple[int, int], *, guided: bool) -> Tiling:
    """The windows for a latent of ``latent_hw`` (see the module doc); ``guided``: the UNet runs on a
    doubled batch (classifier-free guidance)."""
    from ldm_sdk.tiling import ActivationModel, plan_tiles

    bundle = run.bundle
    f = bundle.downsampling_factor
    align = unet_align(bundle)
    multiple = f * align
    if request.overlap % f:
        raise TaskError(
            f"overlap {request.overlap} is not a multiple of the latent factor {f}; use "
            f"{request.overlap // f * f} or {(request.overlap // f + 1) * f}"
        )
    overlap = request.overlap // f
    if request.tile is not None:
        tile = request.tile
        if tile % multiple:
            low = max(multiple, tile // multiple * multiple)
            raise TaskError(
                f"tile {tile} is not a multiple of {multiple} (this model's latent factor {f} x UNet "
                f"downsampling {align}); use {low} or {(tile // multiple + 1) * multiple}"
            )
        if request.overlap > tile - multiple:
            raise TaskError(
                f"overlap {request.overlap} is too large for tile {tile}: it must be at most "
                f"{tile - multiple} (windows must advance by at least {multiple} pixels)"
            )
        side = tile // f
        return Tiling((side, side), overlap, (side, side), overlap, align, "request")
    budget = activation_budget(run, request)
    if budget is None:
        return Tiling(None, overlap, None, overlap, align, "whole")
    bpe = torch.finfo(run.dtype).bits // 8
    assert bundle.config.unet is not None
    batch = 2 if guided else 1
    shape = (batch, bundle.latent_channels, *latent_hw)
    unet_model = ActivationModel.for_unet(bundle.config.unet)
    try:
        unet_plan = plan_tiles(shape, bpe, budget, model=unet_model, align=align, overlap=overlap)
        decode_model = ActivationModel.for_decoder(bundle.config.first_stage.ddconfig)
        decode_plan = plan_tiles((1, *shape[1:]), bpe, budget, model=decode_model, overlap=overlap)
    except ValueError as exc:
        raise TaskError(str(exc)) from None
    source: Literal["budget", "whole"] = "budget" if unet_plan.tiled or decode_plan.tiled else "whole"
    return Tiling(
        unet_plan.tile, unet_plan.overlap, decode_plan.tile, decode_plan.overlap, align, source, budget
    )


def activation_budget(run: Run, request: TiledRequest) -> int | None:
    """Bytes the activations may take: the request's ``memory_budget_mb``; else the smaller of what the
    runtime's memory budget leaves beside its loaded models and 80% of the free CUDA memory (either may be
    absent); None when neither is known."""
    from ldm_sdk.tiling import available_accelerator_bytes

    if request.memory_budget_mb is not None:
        return request.memory_budget_mb * 2**20
    candidates: list[int] = []
    stats = run.runtime.cache_stats()
    if stats.budget_bytes is not None:
        left = stats.budget_bytes - stats.resident_bytes
        if left <= 0:
            raise TaskError(
                f"the runtime's memory budget ({stats.budget_bytes / 2**20:.0f} MiB) is used up by the "
                f"loaded models ({stats.resident_bytes / 2**20:.0f} MiB): nothing is left for activations; "
                "give memory_budget_mb (--memory-budget) or a larger runtime budget"
            )
        candidates.append(left)
    free = available_accelerator_bytes(run.device)
    if free is not None:
        candidates.append(free)
    return min(candidates) if candidates else None


def _denoiser(run: Run, guided: Guided, tiling: Tiling, latent_hw: tuple[int, int]) -> TiledDenoiser | None:
    """The :class:`~ldm_sdk.tiling.TiledDenoiser` the plan asks for (None: untiled, the bundle's own)."""
    if tiling.unet_tile is None:
        return None
    from ldm_sdk.tiling import TiledDenoiser

    bundle = run.bundle
    # the fast path: every window goes through the model's CapturedModel. The windows all have the tile's
    # size (the last one along an axis is shifted inward, TileGrid), so one capture serves them all.
    captured = run.captured if run.request.accelerate else None

    def build(cond: Any, unc: Any) -> Denoiser:
        if captured is not None:
            from ldm_sdk.accel.graphs import bundle_denoiser

            scale = guided.guidance
            return bundle_denoiser(bundle, cond, guidance_scale=scale, uncond=unc, captured=captured)
        return bundle.denoiser(cond, guidance_scale=guided.guidance, uncond=unc)

    assert bundle.schedule is not None
    return TiledDenoiser.from_conditioning(
        build,
        guided.cond,
        guided.uncond if guided.guidance != 1.0 else None,
        schedule=bundle.schedule,
        latent_hw=latent_hw,
        tile=tiling.unet_tile,
        overlap=tiling.unet_overlap,
        align=tiling.align,
    )


def sample_latents(run: Run, guided: Guided, shape: tuple[int, int, int, int], tiling: Tiling) -> Tensor:
    """Sample every batch item (generator ``seed + i``) through the (tiled) denoiser; ``[B, C, h, w]``.

    :meth:`Run.sample_latents <ldm_sdk.tasks.runner.Run.sample_latents>` (the conventions of
    :func:`~ldm_sdk.tasks.sampling.run_sampling`) with the plan's :class:`~ldm_sdk.tiling.TiledDenoiser`;
    an untiled run is exactly the plain sampling run.
    """
    return run.sample_latents(
        guided,
        shape,
        whole_decode=tiling.decode_tile is None,  # a decode through windows compiles nothing ahead
        denoiser=_denoiser(run, guided, tiling, (shape[2], shape[3])),
    )


def render(
    run: Run, request: TiledRequest, guided: Guided, latent_hw: tuple[int, int]
) -> tuple[Tensor, list[np.ndarray]]:
    """Plan the windows for a latent of ``latent_hw`` (recorded in ``extra["tiling"]``), sample every batch
    item for ``guided`` and decode: ``(latents, images)``."""
    shape = (1, run.bundle.latent_channels, latent_hw[0], latent_hw[1])
    tiling = plan_tiling(run, request, latent_hw, guided=guided.guidance != 1.0)
    latents = sample_latents(run, guided, shape, tiling)
    images = decode_latents(run, latents, tiling)
    run.extra["tiling"] = tiling.record()
    return latents, images


def decode_latents(run: Run, latents: Tensor, tiling: Tiling) -> list[np.ndarray]:
    """Latents -> uint8 images, one item at a time, through windows when the plan says so."""
    from ldm_sdk.tasks.images import tensor_to_images
    from ldm_sdk.tiling import tiled_decode

    if tiling.decode_tile is None:
        return run.decode(latents)
    f = run.bundle.downsampling_factor
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for z in latents.split(1):
            image = tiled_decode(
                run.bundle.decode_first_stage,
                z.to(run.device, run.dtype),
                factor=f,
                tile=tiling.decode_tile,
                overlap=min(tiling.decode_overlap, min(tiling.decode_tile) - 1),
                context=DECODE_CONTEXT,
            )
            out += tensor_to_images(image)
    return out


def refuse_guidance(run: Run, what: str) -> None:
    """Concat-conditioned models (SR, semantic) have no unconditional input: guidance must stay off."""
    if run.request.guidance not in (None, 1.0):
        raise TaskError(
            f"model {run.bundle.family!r} is conditioned on {what} concatenated to the latent and was never "
            f"trained without it: there is no classifier-free guidance; leave guidance unset or 1"
        )


def concat_encoder(run: Run, modality: str, what: str) -> ConditionEncoder:
    """The run's condition encoder, which must be of ``modality`` (``what``: how the error names it)."""
    encoder = run.encoder()
    if encoder is None or encoder.modality != modality:
        got = "none" if encoder is None else repr(encoder.modality)
        raise TaskError(f"the {run.name} task needs {what} encoder (modality {modality!r}); got {got}")
    return encoder


def concat_conditioning(run: Run, concat: Tensor, what: str) -> Guided:
    """The conditioning of a concat-conditioned model (checked by :func:`check_concat`; no guidance)."""
    from ldm_sdk.diffusion.conditioning import Conditioning
    from ldm_sdk.tasks.runner import Guided

    check_concat(run, concat, what)
    return Guided(cond=Conditioning(concat=concat), uncond=None, guidance=1.0)


def check_concat(run: Run, concat: Tensor, what: str) -> None:
    """The concat map must fill exactly the UNet input channels the latent leaves."""
    bundle = run.bundle
    assert bundle.config.unet is not None
    want = bundle.config.unet.in_channels - bundle.latent_channels
    if concat.shape[1] != want:
        raise TaskError(
            f"model {bundle.family!r} takes {want} concat channel(s) (UNet input "
            f"{bundle.config.unet.in_channels} - latent {bundle.latent_channels}); the {what} encoder gives "
            f"{concat.shape[1]}"
        )
