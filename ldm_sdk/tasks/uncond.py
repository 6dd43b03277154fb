"""Unconditional sampling (LDM CelebA-HQ / FFHQ / LSUN models): noise in, image out."""

from __future__ import annotations

from typing import ClassVar

from ldm_sdk.tasks.base import TaskRequest, UncondRequest
from ldm_sdk.tasks.runner import GenerationTask

__all__ = ["UncondRequest", "Unconditional", "uncond"]


class Unconditional(GenerationTask[UncondRequest]):
    """``uncond(UncondRequest(model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "uncond"
    title: ClassVar[str] = "the uncond task"
    request_type: ClassVar[type[TaskRequest]] = UncondRequest


uncond = Unconditional()
