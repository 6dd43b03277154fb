"""Text to image (Rombach et al. 2022, Sec. 4.3; Stable Diffusion): sample a latent for a prompt, decode it.

The text encoder is the model's own cond stage (built from the checkpoint by the encoder plugins) or the one
given as ``inputs.encoder``; a prompt longer than its tokenizer allows is refused (``check_length``), not
truncated. Guidance uses ``negative_prompt`` (default: the empty prompt) as the unconditional half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ldm_sdk.tasks.base import TaskInputs, TaskRequest, TaskResult, Txt2ImgRequest
from ldm_sdk.tasks.runner import Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Txt2Img", "Txt2ImgRequest", "txt2img"]


class Txt2Img:
    """``txt2img(Txt2ImgRequest(prompt=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "txt2img"
    request_type: ClassVar[type[TaskRequest]] = Txt2ImgRequest

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, Txt2ImgRequest):
            raise TypeError(f"txt2img takes a Txt2ImgRequest, got {type(request).__name__}")
        run = Run.start(self.name, request, runtime, inputs, callback)
        height, width = run.output_size(request.height, request.width)
        guided = run.conditioning(prompt=request.prompt, negative_prompt=request.negative_prompt)
        return run.generate(guided, height, width)


txt2img = Txt2Img()
