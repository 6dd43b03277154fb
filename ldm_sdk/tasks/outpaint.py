"""Outpainting: extend the canvas by ``left`` / ``right`` / ``top`` / ``bottom`` pixels, paint the new area.

The new area is filled (``edge``: replicate the border, ``reflect``: mirror the image, ``noise``: uniform
noise from the seed) so that the first stage sees something plausible there, masked (repaint = the new area
only), and inpainted (:func:`ldm_sdk.tasks.inpaint.paint`, either method). The original pixels come back
byte-identical at their new position; ``feather`` softens the seam on the new side only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ldm_sdk.tasks.base import BaseTask, OutpaintRequest, TaskError, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.inpaint import paint
from ldm_sdk.tasks.runner import InputReader, Run

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Outpaint", "OutpaintRequest", "expand_canvas", "outpaint"]


def expand_canvas(
    image: np.ndarray, left: int, right: int, top: int, bottom: int, fill: str, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The extended canvas (uint8) and its repaint region (True on the new area)."""
    widths = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(image, widths, mode="edge")
    elif fill == "reflect":
        canvas = np.pad(image, widths, mode="symmetric")
    elif fill == "noise":
        rng = np.random.default_rng(seed)
        canvas = rng.integers(0, 256, size=(top + image.shape[0] + bottom, left + image.shape[1] + right, 3))
        canvas = canvas.astype(np.uint8)
        canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
    else:
        raise TaskError(f"unknown fill {fill!r}; valid: edge, reflect, noise")
    region = np.ones(canvas.shape[:2], dtype=bool)
    region[top : top + image.shape[0], left : left + image.shape[1]] = False
    return np.ascontiguousarray(canvas), region


class Outpaint(BaseTask[OutpaintRequest]):
    """``outpaint(OutpaintRequest(image=..., right=256, prompt=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "outpaint"
    request_type: ClassVar[type[TaskRequest]] = OutpaintRequest

    def run(
        self, request: OutpaintRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        if not (request.left or request.right or request.top or request.bottom):
            raise TaskError("outpaint needs at least one of left / right / top / bottom > 0 (pixels to add)")
        reader = InputReader(self.name)
        image = reader.image("image", request.image, inputs.image)
        run = Run.start(self.name, request, runtime, inputs, callback, records=reader.records)
        canvas, region = expand_canvas(
            image, request.left, request.right, request.top, request.bottom, request.fill, request.seed
        )
        run.extra["canvas"] = {"left": request.left, "top": request.top, "size": list(canvas.shape[:2])}
        return paint(run, request, canvas, region, feather=request.feather, method=request.method)


outpaint = Outpaint()
