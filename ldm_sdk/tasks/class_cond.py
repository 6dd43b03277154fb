"""Class-conditional sampling (LDM cin256: a class embedding by cross-attention, or a UNet label embedding).

Guidance needs the class the model was trained to treat as "no class" (cin256-v2: 1000): pass
``uncond_class``; it is never guessed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ldm_sdk.tasks.base import ClassRequest, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.runner import Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["ClassConditional", "ClassRequest", "class_cond"]


class ClassConditional:
    """``class_cond(ClassRequest(class_label=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "class"
    request_type: ClassVar[type[TaskRequest]] = ClassRequest

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, ClassRequest):
            raise TypeError(f"the class task takes a ClassRequest, got {type(request).__name__}")
        run = Run.start(self.name, request, runtime, inputs, callback)
        height, width = run.output_size(request.height, request.width)
        guided = run.conditioning(class_label=request.class_label, uncond_class=request.uncond_class)
        return run.generate(guided, height, width)


class_cond = ClassConditional()
