"""x4 super-resolution with LDM-SR models (``bsr_sr``, Rombach et al. 2022, Sec. 4.4) at any size.

The SR model denoises a latent of the low-res image's size (VQ-f4 first stage: the output is 4x the input)
with the low-res image itself, in [-1, 1], concatenated to the latent
(:class:`~ldm_sdk.encoders.lowres.LowResImage`; UNet input = latent channels + 3). Because the UNet is
convolutional, any input size works: the latent is denoised whole or, with ``tile`` or a memory budget,
as overlapping windows blended in latent space, the low-res concat map cropped to each window
(:mod:`ldm_sdk.tasks.tiled`); the first stage then decodes through windows too.

The low-res image's sides must be multiples of the UNet's downsampling (8 for ``bsr_sr``): otherwise
``fit="pad"`` (edge pixels replicated; the result is cropped back to exactly 4x the input) or ``"crop"``.
The SR model has no unconditional input, so guidance must stay off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from ldm_sdk.tasks.base import TaskError, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.tiled import (
    TiledRequest,
    check_concat,
    decode_latents,
    plan_tiling,
    refuse_guidance,
    sample_latents,
    unet_align,
)

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Upscale", "UpscaleRequest", "upscale"]


class UpscaleRequest(TiledRequest):
    """Upscale ``image`` (path, or ``TaskInputs.image``) by the model's latent factor (x4 for ``bsr_sr``).

    ``fit``: what to do when the image's sides are not multiples of the UNet's downsampling: ``"error"``
    (default), ``"pad"`` (result cropped back to exactly factor x input) or ``"crop"``. Tiling options:
    :class:`~ldm_sdk.tasks.tiled.TiledRequest` (``tile`` / ``overlap`` in output pixels).
    """

    task: ClassVar[str] = "upscale"
    image: str | None = None
    fit: Literal["error", "pad", "crop"] = "error"


class Upscale:
    """``upscale(UpscaleRequest(image=..., model=...), runtime) -> TaskResult`` (images factor x larger)."""

    name: ClassVar[str] = "upscale"
    request_type: ClassVar[type[TaskRequest]] = UpscaleRequest

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, UpscaleRequest):
            raise TypeError(f"upscale takes an UpscaleRequest, got {type(request).__name__}")
        import torch

        from ldm_sdk.diffusion.conditioning import Conditioning
        from ldm_sdk.tasks.images import fit_array, to_tensor
        from ldm_sdk.tasks.runner import Guided, Run

        run = Run.start(self.name, request, runtime, inputs, callback)
        refuse_guidance(run, "the low-res image")
        bundle = run.bundle
        encoder = run.encoder()
        if encoder is None or encoder.modality != "lowres":
            got = "none" if encoder is None else repr(encoder.modality)
            raise TaskError(f"the upscale task needs a low-res image encoder (modality 'lowres'); got {got}")
        image = run.image_input("image", request.image, run.inputs.image)
        h, w = image.shape[:2]
        align = unet_align(bundle)
        if request.fit == "error":
            _check_lowres_size(h, w, align, bundle.downsampling_factor)
        fitted = fit_array(image, align, request.fit)
        lowres = to_tensor(fitted, device=run.device, dtype=run.dtype)
        with torch.inference_mode():
            concat = encoder(lowres)
        check_concat(run, concat, "low-res image")
        fh, fw = fitted.shape[:2]
        guided = Guided(cond=Conditioning(concat=concat), uncond=None, guidance=1.0)
        shape = (1, bundle.latent_channels, fh, fw)
        tiling = plan_tiling(run, request, (fh, fw), guided=False)
        latents = sample_latents(run, guided, shape, tiling)
        images = decode_latents(run, latents, tiling)
        f = bundle.downsampling_factor
        if request.fit == "pad":
            images = [img[: h * f, : w * f].copy() for img in images]
        run.extra["fit"] = {"mode": request.fit, "input_size": [h, w], "fitted_size": [fh, fw]}
        run.extra["scale"] = f
        run.extra["tiling"] = tiling.record()
        return run.finish(images, latents)


def _check_lowres_size(h: int, w: int, align: int, factor: int) -> None:
    bad = [(name, v) for name, v in (("height", h), ("width", w)) if v % align]
    if not bad:
        return
    nearest = "; ".join(
        f"{name} {v}: use {max(align, v // align * align)} or {(v // align + 1) * align}" for name, v in bad
    )
    raise TaskError(
        f"low-res image size {w}x{h} (WxH) is not a multiple of {align} (the SR UNet halves the latent, "
        f"which is the low-res image's size, {align.bit_length() - 1} times); {nearest}; or let the SDK fit "
        f"it: --pad (replicate the right/bottom edges; the result is cropped back to exactly {factor}x the "
        "input) or --crop (drop the right/bottom remainder). Images are never resized silently"
    )


upscale = Upscale()
