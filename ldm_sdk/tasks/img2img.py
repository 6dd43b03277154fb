"""Image to image (SDEdit, Meng et al. 2022), the CompVis ``scripts/img2img.py`` way.

The image is encoded (posterior mode), noised to the timestep ``strength`` selects among the sampler's
timesteps (:func:`~ldm_sdk.diffusion.img2img.img2img_start`, CompVis off-by-one kept) and denoised over
the remaining ``int(strength * steps)`` steps with the model's conditioning (prompt, class label or none).
Sizes that are not a multiple of the model's size multiple need ``fit="pad"`` (result cropped back to the
input size) or ``fit="crop"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ldm_sdk.tasks.base import Img2ImgRequest, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.context import check_size, size_multiple
from ldm_sdk.tasks.images import fit_array
from ldm_sdk.tasks.runner import InputReader, Run
from ldm_sdk.tasks.sampling import run_sampling

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Img2Img", "Img2ImgRequest", "img2img"]


class Img2Img:
    """``img2img(Img2ImgRequest(image=..., strength=0.75, ...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "img2img"
    request_type: ClassVar[type[TaskRequest]] = Img2ImgRequest

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, Img2ImgRequest):
            raise TypeError(f"img2img takes an Img2ImgRequest, got {type(request).__name__}")
        inputs = inputs or TaskInputs()
        reader = InputReader(self.name)
        image = reader.image("image", request.image, inputs.image)
        run = Run.start(self.name, request, runtime, inputs, callback, records=reader.records)
        h, w = image.shape[:2]
        multiple = size_multiple(run.bundle)
        if request.fit == "error":
            check_size(h, w, multiple)
        fitted = fit_array(image, multiple, request.fit)
        guided = run.conditioning(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            class_label=request.class_label,
            uncond_class=request.uncond_class,
        )
        init = run.encode(fitted)
        shape = tuple(init.shape)

        def item(generator: torch.Generator, cb: StepCallback | None) -> Tensor:
            return run_sampling(
                run.bundle,
                guided.cond,
                guided.uncond,
                shape,
                request,
                generator,
                cb,
                init=init,
                strength=request.strength,
                **run.sample_kwargs(guided),
            )

        latents = run.sample(item)
        images = run.decode(latents)
        if request.fit == "pad":
            images = [img[:h, :w].copy() for img in images]
        run.extra["fit"] = {"mode": request.fit, "input_size": [h, w], "fitted_size": list(fitted.shape[:2])}
        return run.finish(images, latents)


img2img = Img2Img()
