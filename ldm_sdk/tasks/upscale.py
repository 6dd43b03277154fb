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

from ldm_sdk.tasks.base import BaseTask, TaskError, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.tiled import (
    TiledRequest,
    concat_conditioning,
    concat_encoder,
    refuse_guidance,
    render,
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


class Upscale(BaseTask[UpscaleRequest]):
    """``upscale(UpscaleRequest(image=..., model=...), runtime) -> TaskResult`` (images factor x larger)."""

    name: ClassVar[str] = "upscale"
    request_type: ClassVar[type[TaskRequest]] = UpscaleRequest

    def run(
        self, request: UpscaleRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        import torch

        from ldm_sdk.tasks.images import to_tensor
        from ldm_sdk.tasks.runner import Run

        run = Run.start(self.name, request, runtime, inputs, callback)
        refuse_guidance(run, "the low-res image")
        bundle = run.bundle
        encoder = concat_encoder(run, "lowres", "a low-res image")
        image = run.image_input("image", request.image, run.inputs.image)
        align = unet_align(bundle)
        f = bundle.downsampling_factor
        if request.fit == "error":
            _check_lowres_size(*image.shape[:2], align, f)
        fitted = run.fit_input(image, request.fit, multiple=align)
        lowres = to_tensor(fitted, device=run.device, dtype=run.dtype)
        with torch.inference_mode():
            concat = encoder(lowres)
        guided = concat_conditioning(run, concat, "low-res image")
        latents, images = render(run, request, guided, (fitted.shape[0], fitted.shape[1]))
        run.extra["scale"] = f
        return run.finish(run.unfit(images, scale=f), latents)


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
