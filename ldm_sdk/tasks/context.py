"""The model side of a task: loading it, what it can do, its sizes, its condition encoder, generators.

- :func:`load_bundle`: the request's model through the runtime's cache (or the bundle given in memory).
- :func:`supported_tasks` / :func:`require_task`: which tasks a model can do, computed from its conditioning
  key, its UNet input channels and its cond stage's modality; a task the model cannot do is a
  :class:`~ldm_sdk.tasks.base.UnsupportedTaskError` listing the ones it can.
- :func:`size_multiple` / :func:`check_size`: image sizes must be multiples of the latent factor times the
  UNet's downsampling (``f * 2 ** (levels - 1)``); errors name the nearest valid sizes and ``pad`` / ``crop``.
- :func:`cond_stage`: the model's condition encoder, built once per loaded bundle (kept on the bundle).
- :func:`captured_model`: the model's CUDA-graph fast path, one per loaded model (kept in the model cache).
- :func:`make_generator`: an explicit ``torch.Generator`` on the task's device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ldm_sdk.tasks.base import NoDefaultModelError, TaskError, TaskInputs, TaskRequest, UnsupportedTaskError

if TYPE_CHECKING:
    from collections.abc import Callable

    from ldm_sdk.accel.graphs import CapturedModel, CaptureMode
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.diffusion.conditioning import Conditioning
    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.registry import Registry
    from ldm_sdk.runtime import Runtime

__all__ = [
    "CAPTURED_DECODER",
    "CAPTURED_ENCODER",
    "CAPTURED_MODEL",
    "FIRST_STAGE_GRAPH_POOL",
    "TASK_MAX_GRAPHS",
    "bundle_device_dtype",
    "captured_decoder",
    "captured_encoder",
    "captured_model",
    "check_size",
    "cond_modality",
    "cond_stage",
    "default_size",
    "is_inpainting_model",
    "load_bundle",
    "make_generator",
    "require_task",
    "size_multiple",
    "supported_tasks",
]

_COND_STAGE_ATTR = "_ldm_sdk_task_cond_stage"
#: the name of the tasks' CapturedModel among a cached model's attachments (``ModelCache.attachment``)
CAPTURED_MODEL = "ldm_sdk.tasks.captured_model"
#: the name of the tasks' captured first-stage decode among a cached model's attachments
CAPTURED_DECODER = "ldm_sdk.tasks.captured_decoder"
#: the name of the tasks' captured first-stage encode among a cached model's attachments
CAPTURED_ENCODER = "ldm_sdk.tasks.captured_encoder"
#: the CUDA-graph memory pool the captured encode and decode share (a cached model's attachment)
FIRST_STAGE_GRAPH_POOL = "ldm_sdk.tasks.first_stage_graph_pool"
#: captures (input signatures) a task model keeps: each holds its own activation memory on the GPU, so a host
#: alternating between two sizes (or guided / unguided) keeps both, and a third evicts the oldest
TASK_MAX_GRAPHS = 2


# -- the model ---------------------------------------------------------------------------------------------
def load_bundle(request: TaskRequest, runtime: Runtime, inputs: TaskInputs | None = None) -> ModelBundle:
    """``inputs.bundle`` when given, else ``request.model`` loaded through ``runtime`` (cached)."""
    from ldm_sdk.checkpoints.bundle import ModelBundle

    if inputs is not None and inputs.bundle is not None:
        bundle = inputs.bundle
        device, dtype = bundle_device_dtype(bundle)
        from ldm_sdk.devices import dtype_name

        if request.device is not None and torch.device(request.device) != device:
            raise TaskError(
                f"the model given in memory is on {device}, the request asks for device {request.device!r}; "
                "move the model (bundle.to(...)) or leave device unset"
            )
        if request.dtype is not None and request.dtype != dtype_name(dtype):
            raise TaskError(
                f"the model given in memory is {dtype_name(dtype)}, the request asks for dtype "
                f"{request.dtype!r}; convert the model or leave dtype unset"
            )
        return bundle
    if request.model is None:
        raise NoDefaultModelError()
    from pathlib import Path

    path = Path(request.model).expanduser()
    if not path.exists():
        raise TaskError(f"model not found: {path} (pass a .safetensors / .ckpt file or a diffusers folder)")
    model = runtime.load_model(
        path, request.config, use_ema=request.use_ema, device=request.device, dtype=request.dtype
    )
    if not isinstance(model, ModelBundle):
        raise TaskError(f"{path} did not load as a latent diffusion model (got {type(model).__name__})")
    return model


def bundle_device_dtype(bundle: ModelBundle) -> tuple[torch.device, torch.dtype]:
    """Where the bundle's networks live and their floating dtype."""
    p = next(bundle.first_stage_model.parameters())
    return p.device, p.dtype


def cond_modality(bundle: ModelBundle, registry: Registry[Any] | None = None) -> str | None:
    """The modality of the model's condition (text, class, mask, lowres, semantic, layout, ...), or None
    for an unconditional model; ``"unknown"`` when no registered encoder claims the cond stage target."""
    from ldm_sdk.checkpoints.original_config import FIRST_STAGE_COND, UNCONDITIONAL
    from ldm_sdk.encoders.from_bundle import COND_STAGE_KEY_MODALITY, encoder_specs

    cond = bundle.config.cond_stage
    if cond is None or cond.target == UNCONDITIONAL:
        return None
    if cond.target == FIRST_STAGE_COND:
        return "mask"
    diffusion = bundle.config.diffusion
    by_key = COND_STAGE_KEY_MODALITY.get(diffusion.cond_stage_key) if diffusion is not None else None
    modalities: set[str] = set()
    if registry is not None:
        specs = encoder_specs(registry).values()
        modalities = {s.modality for s in specs if cond.target in s.compvis_targets}
    if by_key is not None and (not modalities or by_key in modalities):
        return by_key
    if len(modalities) == 1:
        return modalities.pop()
    return "unknown"


def is_inpainting_model(bundle: ModelBundle, registry: Registry[Any] | None = None) -> bool:
    """A dedicated inpainting model: LDM (concat, first stage as cond stage, ``2 * c + 1`` input channels)
    or Stable Diffusion (hybrid: text cross-attention + ``2 * c + 1`` input channels)."""
    if bundle.model is None or bundle.config.unet is None:
        return False
    key = bundle.conditioning_key
    c = bundle.latent_channels
    in_channels = bundle.config.unet.in_channels
    modality = cond_modality(bundle, registry)
    if key == "concat" and modality == "mask":
        return in_channels == 2 * c + 1
    return key == "hybrid" and in_channels == 2 * c + 1 and modality in ("text", "unknown")


def supported_tasks(bundle: ModelBundle, registry: Registry[Any] | None = None) -> tuple[str, ...]:
    """The tasks ``bundle`` can do, from its conditioning key, input channels and cond stage modality."""
    if bundle.model is None:
        return ()
    key = bundle.conditioning_key
    modality = cond_modality(bundle, registry)
    editing = ("img2img", "inpaint", "outpaint")  # mask-blended sampling works with any such model
    if is_inpainting_model(bundle, registry):
        return ("inpaint", "outpaint")
    if key is None:
        return ("uncond", *editing)
    if key == "crossattn" and modality == "text":
        return ("txt2img", *editing)
    if key in ("crossattn", "adm") and modality == "class":
        return ("class", *editing)
    if key == "crossattn" and modality == "layout":
        return ("layout",)
    if key in ("concat", "hybrid", "hybrid-adm") and modality == "lowres":
        return ("upscale",)
    if key == "concat" and modality == "semantic":
        return ("semantic",)
    return ()


def require_task(bundle: ModelBundle, task: str, registry: Registry[Any] | None = None) -> None:
    """Raise :class:`UnsupportedTaskError` when ``bundle`` cannot do ``task``, naming what it can do."""
    tasks = supported_tasks(bundle, registry)
    if task in tasks:
        return
    modality = cond_modality(bundle, registry)
    what = (
        f"model {bundle.family!r} (conditioning_key {bundle.conditioning_key!r}, "
        f"condition: {modality or 'none (unconditional)'})"
    )
    if bundle.model is None:
        raise UnsupportedTaskError(f"{what} is a first-stage-only (autoencoder) file: it cannot run {task!r}")
    can = ", ".join(tasks) if tasks else "none of the built-in tasks"
    raise UnsupportedTaskError(f"{what} cannot do {task!r}; it supports: {can}")


# -- sizes -------------------------------------------------------------------------------------------------
def size_multiple(bundle: ModelBundle) -> int:
    """What image sides must be multiples of: the first stage's factor times ``2 ** (levels - 1)`` of the
    UNet (it halves the latent that often and doubles it back)."""
    factor = bundle.downsampling_factor
    if bundle.config.unet is None:
        return factor
    return factor * 2 ** (len(bundle.config.unet.channel_mult) - 1)


def default_size(bundle: ModelBundle) -> tuple[int, int]:
    """The model's training size in pixels, ``(height, width)``."""
    diffusion = bundle.config.diffusion
    side = (diffusion.image_size if diffusion is not None else 32) * bundle.downsampling_factor
    return side, side


def check_size(height: int, width: int, multiple: int, *, what: str = "image", can_fit: bool = True) -> None:
    """Raise :class:`TaskError` unless both sides are positive multiples of ``multiple``; the message gives
    the nearest valid sizes and, when ``can_fit``, the ``pad`` / ``crop`` options."""
    bad = [(name, v) for name, v in (("height", height), ("width", width)) if v % multiple or v <= 0]
    if not bad:
        return
    nearest = "; ".join(
        f"{name} {v}: use {max(multiple, v // multiple * multiple)} or {(v // multiple + 1) * multiple}"
        for name, v in bad
    )
    options = (
        "; or let the SDK fit it: --pad (replicate the right/bottom edges; the result is cropped back to the "
        "input size) or --crop (drop the right/bottom remainder)"
        if can_fit
        else ""
    )
    raise TaskError(
        f"{what} size {width}x{height} (WxH) is not a multiple of {multiple} (this model's latent factor x "
        f"UNet downsampling); {nearest}{options}. Images are never resized silently"
    )


# -- encoders and randomness ---------------------------------------------------------------------------
def cond_stage(bundle: ModelBundle, runtime: Runtime) -> ConditionEncoder | None:
    """The bundle's condition encoder (``build_cond_stage`` with the runtime's encoder registry), built on
    first use and kept with the bundle, so a cached model builds it once."""
    from ldm_sdk.encoders.from_bundle import build_cond_stage

    device, dtype = bundle_device_dtype(bundle)
    cached = bundle.__dict__.get(_COND_STAGE_ATTR)
    if cached is not None and cached[0] == (device, dtype):
        return cached[1]  # type: ignore[no-any-return]
    encoder = build_cond_stage(bundle, runtime.registries.condition_encoders, device=device, dtype=dtype)
    # plain attribute, not a registered submodule: the bundle's state_dict stays the checkpoint's
    object.__setattr__(bundle, _COND_STAGE_ATTR, ((device, dtype), encoder))
    return encoder


def captured_model(bundle: ModelBundle, runtime: Runtime) -> CapturedModel | None:
    """The bundle's network call as a :class:`~ldm_sdk.accel.graphs.CapturedModel` (mode: the runtime's
    ``capture_mode``), for :func:`~ldm_sdk.tasks.sampling.run_sampling`; None where the eager call is used:
    the runtime's capture mode is ``"off"``, or ``"auto"`` with the model off CUDA (there a capture would be
    a plain call), the model is first-stage-only, or part of its UNet is in training mode (a model built in
    memory without ``.eval()``: a graph would freeze its dropout; loaded models are in eval mode).

    A model in the runtime's cache has one, made on first use and kept with the cache entry
    (:meth:`~ldm_sdk.runtime_cache.ModelCache.attachment`): its graphs are captured once and replayed by
    every later job, and go when the model leaves the device (eviction, ``runtime.release()``, offload). A
    model given in memory (``TaskInputs.bundle``) gets a new one, which lives as long as the caller keeps
    it (a task keeps it for its run). Captured replay computes what the eager call computes, bit for bit,
    except where the guided step shares its input between the halves
    (:func:`~ldm_sdk.accel.graphs.bundle_denoiser`: up to the kernels' rounding). Output clones are on
    (``clone_output``): PLMS and DPM++ 2M keep earlier model outputs, which an unguided run returns as they
    come from the model.
    """
    mode = cast("CaptureMode", runtime.capture_mode)
    unet = bundle.model
    if mode == "off" or unet is None or any(m.training for m in unet.modules()):
        return None
    if mode == "auto" and next(unet.parameters()).device.type != "cuda":
        return None

    def make() -> CapturedModel:
        from ldm_sdk.accel.graphs import accelerate_denoiser

        return accelerate_denoiser(bundle, mode=mode, max_graphs=TASK_MAX_GRAPHS, clone_output=True)

    kept = runtime.cache.attachment(bundle, CAPTURED_MODEL, make)
    return _release_together(runtime, kept) if kept is not None else make()


def captured_decoder(bundle: ModelBundle, runtime: Runtime) -> CapturedModel | None:
    """The first-stage decode ``latent -> image`` as a :class:`~ldm_sdk.accel.graphs.CapturedModel` (called
    ``decoder(z, t, Conditioning())``; ``t`` is any tensor on ``z``'s device and is not used), kept with the
    cached model like :func:`captured_model`; None where the eager decode is used: the runtime's capture
    mode is ``"off"``, or ``"auto"`` with the first stage off CUDA, or it is in training mode.

    Why: the decoder is ~250 kernels per image; eagerly its launches bound it on a slow host (kl-f8 at
    512 px on an H100: 13.2 ms eager vs 7.3 ms replayed, docs/performance-log.md). The replay computes exactly
    what the eager decode computes. Each captured size holds the decoder's activations on the GPU (a few
    hundred MiB at 512 px), so at most ``TASK_MAX_GRAPHS`` sizes are kept, least recently used evicted.
    """

    def decode(z: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return bundle.decode_first_stage(z)

    return _captured_first_stage(bundle, runtime, CAPTURED_DECODER, decode)


def captured_encoder(bundle: ModelBundle, runtime: Runtime) -> CapturedModel | None:
    """The first-stage encode ``image -> latent before scale_factor`` (:meth:`ModelBundle.first_stage_encoding
    <ldm_sdk.checkpoints.bundle.ModelBundle.first_stage_encoding>`: the KL posterior mode, VQ's encoder
    output) as a :class:`~ldm_sdk.accel.graphs.CapturedModel`, called ``encoder(x, t, Conditioning())`` like
    :func:`captured_decoder` and None where that is None. img2img, blend inpainting and outpainting encode
    their input image once per run (then scaled, as ``encode_first_stage`` does), the inpainting models
    their masked image; eagerly that is launch-bound too (kl-f8 at 512 px on an H100: 8.9 ms of a 311 ms
    inpaint, ``bench/profile_tasks.py``). The output is cloned out of the graph's buffer, since the sampler
    keeps the latent for the whole run."""

    def encode(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return bundle.first_stage_encoding(x)

    return _captured_first_stage(bundle, runtime, CAPTURED_ENCODER, encode)


def _captured_first_stage(
    bundle: ModelBundle,
    runtime: Runtime,
    name: str,
    call: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
) -> CapturedModel | None:
    """``call`` (a first-stage pass) captured as the attachment ``name`` of the cached ``bundle``."""
    mode = cast("CaptureMode", runtime.capture_mode)
    first_stage = bundle.first_stage_model
    if mode == "off" or any(m.training for m in first_stage.modules()):
        return None
    if mode == "auto" and next(first_stage.parameters()).device.type != "cuda":
        return None

    from ldm_sdk.accel.graphs import CapturedModel, SharedGraphPool

    # the encode and the decode never run at once: their graphs share one memory pool (and one lock)
    pool = runtime.cache.attachment(bundle, FIRST_STAGE_GRAPH_POOL, SharedGraphPool)

    def make() -> CapturedModel:
        return CapturedModel(call, mode=mode, max_graphs=TASK_MAX_GRAPHS, modules=[first_stage], pool=pool)

    kept = runtime.cache.attachment(bundle, name, make)
    return _release_together(runtime, kept) if kept is not None else make()


def _release_together(runtime: Runtime, captured: CapturedModel) -> CapturedModel:
    """``captured`` joined with the captured networks (UNet, decode, encode) of every model the runtime
    keeps on the same device, its own included: a capture that runs out of GPU memory releases the graphs
    of all of them before it tries again
    (:meth:`~ldm_sdk.accel.graphs.CapturedModel.release_together`). A released graph is captured again
    when its model next runs."""
    device = _device_of(captured)
    for attached in runtime.cache.resident_attachments():
        for name in (CAPTURED_MODEL, CAPTURED_DECODER, CAPTURED_ENCODER):
            other = attached.get(name)
            if other is not None and other is not captured and _device_of(other) == device:
                captured.release_together(other)
    return captured


def _device_of(captured: CapturedModel) -> torch.device | None:
    """Where the first watched module of ``captured`` keeps its weights."""
    for module in captured.modules:
        for parameter in module.parameters():
            return parameter.device
    return None


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """``torch.Generator`` on ``device`` seeded with ``seed`` (CPU generator for devices without one)."""
    device = torch.device(device)
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(int(seed))
