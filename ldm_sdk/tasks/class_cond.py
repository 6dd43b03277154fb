"""Class-conditional sampling (LDM cin256: a class embedding by cross-attention, or a UNet label embedding).

Guidance needs the class the model was trained to treat as "no class" (cin256-v2: 1000): pass
``uncond_class``; it is never guessed.
"""

from __future__ import annotations

from typing import ClassVar

from ldm_sdk.tasks.base import ClassRequest, TaskRequest
from ldm_sdk.tasks.runner import GenerationTask, Guided, Run

__all__ = ["ClassConditional", "ClassRequest", "class_cond"]


class ClassConditional(GenerationTask[ClassRequest]):
    """``class_cond(ClassRequest(class_label=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "class"
    title: ClassVar[str] = "the class task"
    request_type: ClassVar[type[TaskRequest]] = ClassRequest

    def conditioning(self, run: Run, request: ClassRequest) -> Guided:
        return run.conditioning(class_label=request.class_label, uncond_class=request.uncond_class)


class_cond = ClassConditional()
