"""Image to image (SDEdit, Meng et al. 2022), the CompVis ``scripts/img2img.py`` way.

The image is encoded (posterior mode), noised to the timestep ``strength`` selects among the sampler's
timesteps (:func:`~ldm_sdk.diffusion.img2img.img2img_start`, CompVis off-by-one kept) and denoised over
the remaining ``int(strength * steps)`` steps with the model's conditioning (prompt, class label or none).
Sizes that are not a multiple of the model's size multiple need ``fit="pad"`` (result cropped back to the
input size) or ``fit="crop"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ldm_sdk.tasks.base import BaseTask, Img2ImgRequest, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.runner import InputReader, Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Img2Img", "Img2ImgRequest", "img2img"]


class Img2Img(BaseTask[Img2ImgRequest]):
    """``img2img(Img2ImgRequest(image=..., strength=0.75, ...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "img2img"
    request_type: ClassVar[type[TaskRequest]] = Img2ImgRequest

    def run(
        self, request: Img2ImgRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        reader = InputReader(self.name)
        image = reader.image("image", request.image, inputs.image)
        run = Run.start(self.name, request, runtime, inputs, callback, records=reader.records)
        fitted = run.fit_input(image, request.fit)
        guided = run.image_conditioning(request)
        init = run.encode(fitted)
        latents = run.sample_latents(guided, tuple(init.shape), init=init, strength=request.strength)
        return run.finish(run.unfit(run.decode(latents)), latents)


img2img = Img2Img()
