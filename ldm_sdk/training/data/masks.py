"""Random inpainting masks (1 = the region to fill, as LDM and SD inpainting use them).

Both draw every random number from the ``numpy.random.Generator`` passed in, so a seeded generator gives the
same mask. Output: float ``[1, H, W]`` of 0 / 1.

- :func:`random_box_mask`: one axis-aligned rectangle, each side a uniform fraction of the image side.
- :func:`random_brush_mask`: free-form strokes in the spirit of LaMa's / DeepFill v2's irregular masks:
  polylines of random vertices drawn with a round brush of random width.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}; got {value}")


def random_box_mask(
    rng: np.random.Generator, height: int, width: int, *, side: tuple[float, float] = (0.1, 0.6)
) -> Tensor:
    """A rectangle whose sides are ``uniform(*side)`` times the image's, placed uniformly inside it."""
    _check_range("side", side, 0.0, 1.0)
    h = max(1, round(rng.uniform(*side) * height))
    w = max(1, round(rng.uniform(*side) * width))
    y = int(rng.integers(0, height - h + 1))
    x = int(rng.integers(0, width - w + 1))
    mask = torch.zeros(1, height, width)
    mask[:, y : y + h, x : x + w] = 1.0
    return mask


def random_brush_mask(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    strokes: tuple[int, int] = (1, 4),
    vertices: tuple[int, int] = (2, 6),
    brush: tuple[float, float] = (0.03, 0.12),
) -> Tensor:
    """``strokes`` (inclusive range) polylines of ``vertices`` points each; each segment is at most half
    the shorter image side long; the brush diameter is ``uniform(*brush)`` times the shorter side."""
    from PIL import Image, ImageDraw

    _check_range("brush", brush, 0.0, 1.0)
    if not 1 <= strokes[0] <= strokes[1] or not 2 <= vertices[0] <= vertices[1]:
        raise ValueError(f"need 1 <= strokes and 2 <= vertices ranges; got {strokes}, {vertices}")
    short = min(height, width)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        diameter = max(1, round(rng.uniform(*brush) * short))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        points = [(x, y)]
        for _ in range(int(rng.integers(vertices[0], vertices[1] + 1)) - 1):
            angle = rng.uniform(0.0, 2 * np.pi)
            length = rng.uniform(0.1, 0.5) * short
            x = float(np.clip(x + length * np.cos(angle), 0, width - 1))
            y = float(np.clip(y + length * np.sin(angle), 0, height - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=diameter, joint="curve")
        r = diameter / 2
        for px, py in points:
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return torch.from_numpy((np.asarray(canvas) > 127).astype(np.float32))[None]
