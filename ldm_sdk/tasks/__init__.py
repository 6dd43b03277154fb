"""Editing tasks: txt2img, class-conditional and unconditional sampling, img2img, inpaint, outpaint (and the
large-image tasks upscale, semantic, layout).

Each task is one callable ``task(request, runtime, *, inputs=None, callback=None) -> TaskResult`` with a
pydantic request type (:mod:`ldm_sdk.tasks.base`). :func:`get_task` finds one by name: in the runtime's task
registry (filled by plugins through ``ldm_register_tasks``), else among the built-ins. Importing this package
imports no task module, torch or model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm_sdk.registry import Registry
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks.base import Task

__all__ = ["BUILTIN_TASKS", "builtin_task", "get_task", "register_builtin_tasks"]

#: task name -> "module:attribute" of the task object
BUILTIN_TASKS: dict[str, str] = {
    "txt2img": "ldm_sdk.tasks.txt2img:txt2img",
    "class": "ldm_sdk.tasks.class_cond:class_cond",
    "uncond": "ldm_sdk.tasks.uncond:uncond",
    "img2img": "ldm_sdk.tasks.img2img:img2img",
    "inpaint": "ldm_sdk.tasks.inpaint:inpaint",
    "outpaint": "ldm_sdk.tasks.outpaint:outpaint",
    "upscale": "ldm_sdk.tasks.upscale:upscale",
    "semantic": "ldm_sdk.tasks.semantic:semantic",
    "layout": "ldm_sdk.tasks.layout:layout",
}


def builtin_task(name: str) -> Task:
    """The built-in task called ``name`` (imported on first use)."""
    from ldm_sdk.tasks.base import TaskError

    if name not in BUILTIN_TASKS:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    module, attr = BUILTIN_TASKS[name].split(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def get_task(name: str, runtime: Runtime | None = None) -> Task:
    """The task called ``name``: the runtime's registered one, else the built-in one."""
    if runtime is not None and name in runtime.registries.tasks:
        return runtime.registries.tasks.get(name)  # type: ignore[no-any-return]
    return builtin_task(name)


def register_builtin_tasks(registry: Registry[Any]) -> None:
    """Add every built-in task to ``registry`` (the built-in plugin's ``ldm_register_tasks`` hook)."""
    for name in BUILTIN_TASKS:
        task = builtin_task(name)
        registry.add(name, task, description=(type(task).__doc__ or "").strip().splitlines()[0])
