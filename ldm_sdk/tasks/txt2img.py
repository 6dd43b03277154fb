"""Text to image (Rombach et al. 2022, Sec. 4.3; Stable Diffusion): sample a latent for a prompt, decode it.

The text encoder is the model's own cond stage (built from the checkpoint by the encoder plugins) or the one
given as ``inputs.encoder``; a prompt longer than its tokenizer allows is refused (``check_length``), not
truncated. Guidance uses ``negative_prompt`` (default: the empty prompt) as the unconditional half.
"""

from __future__ import annotations

from typing import ClassVar

from ldm_sdk.tasks.base import TaskRequest, Txt2ImgRequest
from ldm_sdk.tasks.runner import GenerationTask, Guided, Run

__all__ = ["Txt2Img", "Txt2ImgRequest", "txt2img"]


class Txt2Img(GenerationTask[Txt2ImgRequest]):
    """``txt2img(Txt2ImgRequest(prompt=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "txt2img"
    request_type: ClassVar[type[TaskRequest]] = Txt2ImgRequest

    def conditioning(self, run: Run, request: Txt2ImgRequest) -> Guided:
        return run.conditioning(prompt=request.prompt, negative_prompt=request.negative_prompt)


txt2img = Txt2Img()
