"""Inpainting: repaint the masked region of an image; every pixel outside it comes back byte-identical.

Mask convention (user-facing): **white / 1 = the region to repaint**, black / 0 = keep; grey is binarised
at 0.5. ``grow`` dilates that region first; ``feather`` softens the composite's edge inside it.

Two ways to paint, chosen by ``method`` (``auto`` picks the first the model can do):

``model``: a dedicated inpainting model -- LDM ``inpainting_big`` (``concat``, UNet input 3 + 3 + 1: the
    first stage encodes the masked image) or Stable Diffusion inpainting (``hybrid``, 4 + 1 + 4 plus text) --
    conditioned through :class:`~ldm_sdk.encoders.mask.MaskConditioner` on the mask and the masked image.
``blend``: any other model; the known latent is kept outside the (latent-resolution) mask at every step with
    :class:`~ldm_sdk.diffusion.masking.MaskedDenoiser` (CompVis ``ddim_sampling(mask=..., x0=...)``), with the
    model's own conditioning (prompt, class label or none).

Either way the result is decoded and composited in pixel space over the input: ``alpha * generated +
(1 - alpha) * input`` where alpha is the (grown, feathered) region, and the input's exact bytes wherever
alpha is 0 (:func:`ldm_sdk.tasks.masks.composite`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from ldm_sdk.tasks.base import (
    BaseTask,
    ImageRequest,
    InpaintRequest,
    TaskError,
    TaskInputs,
    TaskRequest,
    TaskResult,
    UnsupportedTaskError,
)
from ldm_sdk.tasks.context import is_inpainting_model, size_multiple
from ldm_sdk.tasks.images import fit_array, to_tensor
from ldm_sdk.tasks.masks import binarize, check_mask, composite, composite_alpha, grow, latent_keep_mask
from ldm_sdk.tasks.runner import InputReader, Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Inpaint", "InpaintRequest", "inpaint", "paint"]

Method = Literal["auto", "model", "blend"]


class Inpaint(BaseTask[InpaintRequest]):
    """``inpaint(InpaintRequest(image=..., mask=..., prompt=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "inpaint"
    request_type: ClassVar[type[TaskRequest]] = InpaintRequest

    def run(
        self, request: InpaintRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        reader = InputReader(self.name)
        image = reader.image("image", request.image, inputs.image)
        region = binarize(reader.mask(request.mask, inputs.mask))
        check_mask(region, image.shape[:2])
        region = grow(region, request.grow)
        if request.grow and region.all():
            raise TaskError(f"grown by {request.grow} px, the mask covers the whole image; grow it less")
        run = Run.start(self.name, request, runtime, inputs, callback, records=reader.records)
        return paint(run, request, image, region, feather=request.feather, method=request.method)


def paint(
    run: Run, request: ImageRequest, image: np.ndarray, region: np.ndarray, *, feather: float, method: Method
) -> TaskResult:
    """Repaint ``region`` (boolean ``H x W``, True = repaint) of ``image`` (uint8 ``H x W x 3``) and
    composite over it; shared by inpaint and outpaint."""
    fitted = run.fit_input(image, request.fit)
    fitted_region = fit_array(region, size_multiple(run.bundle), request.fit, pad_value=False)
    if request.fit == "crop":
        image, region = fitted, fitted_region
        check_mask(region, image.shape[:2])
    dedicated = is_inpainting_model(run.bundle, run.runtime.registries.condition_encoders)
    use_model = _choose(method, dedicated, run.bundle.family)
    shape = run.latent_shape(*fitted.shape[:2])
    if use_model:
        concat = _mask_concat(run, fitted, fitted_region)
        guided = run.conditioning(
            prompt=request.prompt, negative_prompt=request.negative_prompt, concat=concat
        )
        known: Tensor | None = None
        keep: Tensor | None = None
    else:
        guided = run.image_conditioning(request)
        known = run.encode(fitted)
        keep = latent_keep_mask(fitted_region, run.bundle.downsampling_factor, run.device)
    latents = run.sample_latents(guided, shape, mask=keep, x0=known)
    alpha = composite_alpha(region, feather)
    images = [composite(image, gen[: image.shape[0], : image.shape[1]], alpha) for gen in run.decode(latents)]
    run.extra.update(method="model" if use_model else "blend", repainted_pixels=int(region.sum()))
    return run.finish(images, latents)


def _choose(method: Method, dedicated: bool, family: str) -> bool:
    """True: paint with the model's own mask conditioning; False: mask-blended sampling."""
    if method == "model" and not dedicated:
        raise UnsupportedTaskError(
            f"method 'model' needs a dedicated inpainting model (LDM inpainting, SD inpainting); {family!r} "
            "is not one: use method 'blend' or 'auto'"
        )
    if method == "blend" and dedicated:
        raise UnsupportedTaskError(
            f"{family!r} is a dedicated inpainting model: its UNet needs the mask conditioning, so it cannot "
            "blend; use method 'model' or 'auto'"
        )
    return dedicated


def _mask_concat(run: Run, image: np.ndarray, region: np.ndarray) -> Tensor:
    """The inpainting model's concat map for ``image`` with ``region`` masked (LDM or SD layout)."""
    from ldm_sdk.encoders.mask import MaskConditioner, MaskedImage

    x = to_tensor(image, device=run.device, dtype=run.dtype)
    m = torch.from_numpy(region.astype(np.float32))[None, None].to(run.device, run.dtype)
    conditioner = MaskConditioner.from_bundle(run.bundle, encode=run.first_stage_encoding)
    with torch.inference_mode():
        return run.check_finite(conditioner(MaskedImage(image=x, mask=m)).float(), "the mask conditioning")


inpaint = Inpaint()
