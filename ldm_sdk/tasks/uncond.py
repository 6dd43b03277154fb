"""Unconditional sampling (LDM CelebA-HQ / FFHQ / LSUN models): noise in, image out."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ldm_sdk.tasks.base import TaskInputs, TaskRequest, TaskResult, UncondRequest
from ldm_sdk.tasks.runner import Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["UncondRequest", "Unconditional", "uncond"]


class Unconditional:
    """``uncond(UncondRequest(model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "uncond"
    request_type: ClassVar[type[TaskRequest]] = UncondRequest

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, UncondRequest):
            raise TypeError(f"the uncond task takes an UncondRequest, got {type(request).__name__}")
        run = Run.start(self.name, request, runtime, inputs, callback)
        height, width = run.output_size(request.height, request.width)
        return run.generate(run.conditioning(), height, width)


uncond = Unconditional()
