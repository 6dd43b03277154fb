"""Overlapping tile grids and blending weights that partition unity.

A :class:`TileGrid` covers an ``H x W`` map with windows of (at most) ``tile_h x tile_w`` that overlap by at
least ``overlap`` pixels, and gives every window a weight map such that, at every pixel, the weights of the
windows covering it sum to 1. Blending per-window results with these weights (``sum_i w_i * f_i``) therefore
reproduces any field that all windows agree on exactly, a constant field in particular, and turns the
disagreement between neighbouring windows into a smooth cross-fade instead of a seam.

Construction, per axis (the 2-D weights are the outer product of the two 1-D weights, so they partition
unity whenever each axis does):

- ``n = 1 + ceil((L - T) / (T - overlap))`` windows of size ``T`` spread evenly from ``0`` to ``L - T``;
  starts are floored to multiples of ``align`` (the UNet's or first stage's resampling factor, so every
  window sees the same pixel phase as the whole map) except the last, which ends at ``L``. If rounding made
  a gap exceed ``T - overlap``, one more window is used. A map that fits (``L <= T``) is one window of
  size ``L``.
- A window's raw weight is 1 inside and ramps up from its edges that border another window, over exactly
  the overlap with that neighbour: ``r(d) = ramp((d + 0.5) / overlap_len)`` at distance ``d`` from the edge,
  with ``ramp(s) = s`` ("linear") or ``sin(pi s / 2) ** 2`` ("cosine"). Edges at the map's border do not
  ramp. Two windows' ramps over one overlap are complementary (they sum to 1); where three windows overlap
  (short maps, large overlaps) the raw weights are divided by their sum, so the weights always partition
  unity, up to float rounding (computed in float64).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
from torch import Tensor

Ramp = Literal["cosine", "linear"]
RAMPS: tuple[str, ...] = get_args(Ramp)


@dataclass(frozen=True)
class Window:
    """A rectangle ``[top, top + height) x [left, left + width)`` of a map."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices: ``t[..., rows, cols]`` is the window of ``t``."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def crop(self, t: Tensor) -> Tensor:
        """The window of ``t`` (a view of its last two dimensions)."""
        rows, cols = self.slices()
        return t[..., rows, cols]

    def scaled(self, factor: int) -> Window:
        """The same window on a map ``factor`` times larger (latent -> pixels)."""
        return Window(self.top * factor, self.left * factor, self.height * factor, self.width * factor)

    def padded(self, context: int, height: int, width: int) -> Window:
        """This window grown by ``context`` on every side, clipped to an ``height x width`` map."""
        top, left = max(0, self.top - context), max(0, self.left - context)
        bottom, right = min(height, self.bottom + context), min(width, self.right + context)
        return Window(top, left, bottom - top, right - left)

    def within(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer`` (which must contain it)."""
        if not (
            outer.top <= self.top
            and outer.left <= self.left
            and self.bottom <= outer.bottom
            and self.right <= outer.right
        ):
            raise ValueError(f"{self} is not inside {outer}")
        return Window(self.top - outer.top, self.left - outer.left, self.height, self.width)

    def shrunk(self, factor: int) -> Window:
        """The same window on a map ``factor`` times smaller (pixels -> latent); coordinates must divide."""
        if any(v % factor for v in (self.top, self.left, self.height, self.width)):
            raise ValueError(f"{self} does not fall on the {factor}x coarser grid")
        return Window(self.top // factor, self.left // factor, self.height // factor, self.width // factor)


def check_ramp(ramp: str) -> None:
    """Raise ValueError for an unknown ramp name."""
    if ramp not in RAMPS:
        raise ValueError(f"unknown ramp {ramp!r}; valid: {', '.join(RAMPS)}")


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Window starts along one axis of ``length`` for windows of ``tile`` overlapping by >= ``overlap``.

    Returns ``[0]`` when the axis fits in one window (that window is then ``length`` long).
    """
    if length < 1:
        raise ValueError(f"cannot tile an axis of length {length}; it must be >= 1")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if tile < 1 or tile % align:
        raise ValueError(f"tile size {tile} must be a positive multiple of {align}")
    if overlap < 0 or tile - overlap < align:
        raise ValueError(
            f"overlap {overlap} must lie in [0, {tile - align}] for tiles of {tile} "
            f"(windows must advance by at least {align})"
        )
    if length <= tile:
        return [0]
    span = length - tile
    n = 1 + math.ceil(span / (tile - overlap))
    while True:
        starts = [(i * span // (n - 1)) // align * align for i in range(n - 1)] + [span]
        if all(b - a <= tile - overlap for a, b in itertools.pairwise(starts)):
            return sorted(set(starts))
        n += 1


def axis_weights(starts: Sequence[int], size: int, length: int, ramp: Ramp = "cosine") -> list[Tensor]:
    """float64 weights (one 1-D tensor of ``size`` per window) that sum to 1 at every position of the axis.

    ``starts`` (ascending) and ``size`` must cover ``[0, length)``; a single window may be shorter than
    ``size`` when it is the whole axis.
    """
    check_ramp(ramp)
    sizes = [min(size, length - s) for s in starts]
    if starts[0] != 0 or starts[-1] + sizes[-1] != length:
        raise ValueError(f"windows {list(starts)} of size {size} do not cover an axis of {length}")
    raw: list[Tensor] = []
    for i, (s, n) in enumerate(zip(starts, sizes, strict=True)):
        if i and starts[i - 1] + sizes[i - 1] < s:
            raise ValueError(f"windows {list(starts)} of size {size} leave a gap before {s}")
        w = torch.ones(n, dtype=torch.float64)
        d = torch.arange(n, dtype=torch.float64)
        if i > 0:  # ramp up over the overlap with the previous window
            w = torch.minimum(w, _ramp((d + 0.5) / (starts[i - 1] + sizes[i - 1] - s), ramp))
        if i + 1 < len(starts):  # ramp down over the overlap with the next window
            w = torch.minimum(w, _ramp((n - 1 - d + 0.5) / (s + n - starts[i + 1]), ramp))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for s, w in zip(starts, raw, strict=True):
        total[s : s + w.shape[0]] += w
    return [w / total[s : s + w.shape[0]] for s, w in zip(starts, raw, strict=True)]


def _ramp(s: Tensor, ramp: Ramp) -> Tensor:
    s = s.clamp(0.0, 1.0)
    return s if ramp == "linear" else torch.sin(0.5 * math.pi * s) ** 2


@dataclass(frozen=True)
class TileGrid:
    """Windows over an ``height x width`` map with weights that partition unity (see the module doc)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    ramp: Ramp = "cosine"

    @classmethod
    def cover(
        cls,
        height: int,
        width: int,
        tile: int | tuple[int, int],
        overlap: int,
        *,
        align: int = 1,
        ramp: Ramp = "cosine",
    ) -> TileGrid:
        """The grid of (at most) ``tile`` windows overlapping by at least ``overlap``, starts on ``align``."""
        check_ramp(ramp)
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        rows = axis_starts(height, th, overlap, align)
        cols = axis_starts(width, tw, overlap, align)
        return cls(height, width, min(th, height), min(tw, width), tuple(rows), tuple(cols), ramp)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def __iter__(self) -> Iterator[Window]:
        for top in self.row_starts:
            for left in self.col_starts:
                yield Window(top, left, self.tile_h, self.tile_w)

    @property
    def windows(self) -> list[Window]:
        return list(self)

    def scaled(self, factor: int) -> TileGrid:
        """The same windows on a map ``factor`` times larger; the ramps grow with them."""
        return TileGrid(
            self.height * factor,
            self.width * factor,
            self.tile_h * factor,
            self.tile_w * factor,
            tuple(s * factor for s in self.row_starts),
            tuple(s * factor for s in self.col_starts),
            self.ramp,
        )

    def shrunk(self, factor: int) -> TileGrid:
        """The same windows on a map ``factor`` times smaller; every coordinate must divide."""
        values = (self.height, self.width, self.tile_h, self.tile_w, *self.row_starts, *self.col_starts)
        if any(v % factor for v in values):
            raise ValueError(f"the tile grid does not fall on the {factor}x coarser grid: {self}")
        return TileGrid(
            self.height // factor,
            self.width // factor,
            self.tile_h // factor,
            self.tile_w // factor,
            tuple(s // factor for s in self.row_starts),
            tuple(s // factor for s in self.col_starts),
            self.ramp,
        )

    @cached_property
    def _axis_weights(self) -> tuple[list[Tensor], list[Tensor]]:
        return (
            axis_weights(self.row_starts, self.tile_h, self.height, self.ramp),
            axis_weights(self.col_starts, self.tile_w, self.width, self.ramp),
        )

    @cached_property
    def _weight_cache(self) -> dict[tuple[Window, str, torch.dtype], Tensor]:
        return {}

    def weight(self, window: Window, *, device: torch.device | None = None, dtype: torch.dtype) -> Tensor:
        """The ``(tile_h, tile_w)`` blending weight of one of this grid's windows (cached per device)."""
        key = (window, str(device), dtype)
        cached = self._weight_cache.get(key)
        if cached is not None:
            return cached
        rows, cols = self._axis_weights
        try:
            wy = rows[self.row_starts.index(window.top)]
            wx = cols[self.col_starts.index(window.left)]
        except ValueError as err:
            raise ValueError(f"{window} is not a window of this grid") from err
        if window.height != wy.shape[0] or window.width != wx.shape[0]:
            raise ValueError(f"{window} is not a window of this grid")
        weight = (wy[:, None] * wx[None, :]).to(device=device, dtype=dtype)
        self._weight_cache[key] = weight
        return weight

    def coverage(self) -> Tensor:
        """The sum of all windows' weights at every pixel (float64; 1 everywhere up to rounding)."""
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        for window in self:
            rows, cols = window.slices()
            total[rows, cols] += self.weight(window, dtype=torch.float64)
        return total


def blend(grid: TileGrid, window: Window, accumulator: Tensor, value: Tensor) -> None:
    """``accumulator[..., window] += weight(window) * value`` (in the accumulator's dtype)."""
    rows, cols = window.slices()
    weight = grid.weight(window, device=accumulator.device, dtype=accumulator.dtype)
    accumulator[..., rows, cols] += weight * value.to(accumulator.dtype)


__all__ = ["RAMPS", "Ramp", "TileGrid", "Window", "axis_starts", "axis_weights", "blend", "check_ramp"]
