"""Semantic synthesis (Rombach et al. 2022, Sec. 4.3.2): a map of class ids -> an image of the map's size.

The LDM semantic model (``semantic_synthesis256``) concatenates the map, one-hot encoded, shrunk to the
latent size and mapped to 3 channels by :class:`~ldm_sdk.encoders.semantic.SpatialRescaler`, to the
latent. The UNet is convolutional, so a model trained on 256x256 renders any size that is a multiple of its
size multiple (1024x512 ...): the latent is denoised whole, or through blended windows when ``tile`` or
the memory budget asks for it (:mod:`ldm_sdk.tasks.tiled`).

The map (``semantic_map``: a file, or ``TaskInputs.extra["semantic_map"]``) is either

- a single-channel image of class ids (PNG mode ``L`` / ``I`` / ``I;16``, or ``P`` whose *indices* are the
  ids; an RGB image whose three channels are equal counts as grey), or an integer ``H x W`` array; or
- a colour image together with its ``palette`` (a JSON file, or ``extra["palette"]``): a list whose entry
  ``i`` is class ``i``'s colour, ``[r, g, b]`` or ``"#rrggbb"``; every pixel must have one of those colours.

Class ids must lie in ``0..n-1`` for the model's ``n`` classes (the encoder's ``in_channels``); sides must
be multiples of the size multiple, else ``fit="pad"`` (edge ids replicated; the image is cropped back) or
``"crop"``. The one-hot map is built in horizontal strips when the encoder is local (2x2-mean shrinking,
as the original's bilinear x0.5), so a large map does not need ``H x W x n`` floats at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ldm_sdk.tasks.base import BaseTask, TaskError, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.tiled import TiledRequest, concat_conditioning, concat_encoder, refuse_guidance, render

if TYPE_CHECKING:
    from torch import Tensor

    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = ["Semantic", "SemanticRequest", "encode_class_map", "read_class_map", "read_palette", "semantic"]

#: one-hot floats per strip when the map is encoded in strips
STRIP_ELEMENTS = 2**24


class SemanticRequest(TiledRequest):
    """Render ``semantic_map`` (see the module doc) with a semantic-synthesis model; ``palette`` maps a
    colour map to class ids; ``fit`` as for images; tiling options of :class:`TiledRequest`."""

    task: ClassVar[str] = "semantic"
    semantic_map: str | None = None
    palette: str | None = None
    fit: Literal["error", "pad", "crop"] = "error"


# -- reading the map -------------------------------------------------------------------------------------
def read_palette(source: str | os.PathLike[str] | Sequence[Any]) -> np.ndarray:
    """A palette (JSON file or list: entry ``i`` = class ``i``'s ``[r, g, b]`` or ``"#rrggbb"``) as an
    ``n x 3`` uint8 array; colours must be distinct."""
    where = "palette"
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        where = f"palette {path}"
        if not path.is_file():
            raise TaskError(f"palette file not found: {path} (a JSON list of [r, g, b] per class id)")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TaskError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(source, Sequence) or isinstance(source, str) or not source:
        raise TaskError(
            f"{where} must be a non-empty list of colours ([r, g, b] or '#rrggbb'), class id = index"
        )
    colours = [_colour(c, i, where) for i, c in enumerate(source)]
    arr = np.array(colours, dtype=np.uint8)
    keys = _keys(arr)
    if len(np.unique(keys)) != len(keys):
        seen: dict[int, int] = {}
        for i, k in enumerate(keys.tolist()):
            if k in seen:
                raise TaskError(f"{where}: classes {seen[k]} and {i} have the same colour {colours[i]}")
            seen[k] = i
    return arr


def _colour(value: Any, index: int, where: str) -> tuple[int, int, int]:
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)
        except ValueError:
            pass
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return int(value[0]), int(value[1]), int(value[2])
    raise TaskError(
        f"{where}: entry {index} ({value!r}) is not a colour; use [r, g, b] in 0..255 or '#rrggbb'"
    )


def _keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def read_class_map(source: Any, palette: np.ndarray | None = None) -> np.ndarray:
    """A semantic map (file, PIL image, array or tensor; see the module doc) as int64 ``H x W`` class ids."""
    from PIL import Image

    from ldm_sdk.tasks.images import open_image

    if isinstance(source, str | os.PathLike):
        source = open_image(source, "semantic map")
    if isinstance(source, Image.Image):
        if source.mode == "P" and palette is None:
            arr = np.asarray(source)  # the indices, not the colours
        elif source.mode in ("L", "I", "I;16", "I;16B", "I;16L") and palette is None:
            arr = np.asarray(source)
        else:
            arr = np.asarray(source.convert("RGB"))
    elif hasattr(source, "detach") and hasattr(source, "cpu"):
        arr = source.detach().cpu().numpy()
    elif isinstance(source, np.ndarray):
        arr = source
    else:
        raise TaskError(
            f"semantic map must be a path, PIL image, array or tensor; got {type(source).__name__}"
        )
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
        if palette is not None:
            return _ids_from_colours(arr, palette)
        if np.all(arr == arr[..., :1]):
            arr = arr[..., 0]
        else:
            raise TaskError(
                "the semantic map is a colour image: give its palette (--palette FILE: a JSON list of "
                "[r, g, b] per class id) or a single-channel image of class ids"
            )
    elif palette is not None and arr.ndim == 2:
        return _ids_from_colours(np.repeat(arr[..., None], 3, axis=2), palette)
    if arr.ndim != 2:
        raise TaskError(
            f"the semantic map must be H x W class ids (or H x W x 3 with a palette); got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer) and (
        not np.issubdtype(arr.dtype, np.floating)
        or not np.all(np.isfinite(arr))
        or np.any(arr != np.round(arr))
    ):
        raise TaskError(
            f"semantic map class ids must be integers; got dtype {arr.dtype} with fractional values"
        )
    return arr.astype(np.int64)


def _ids_from_colours(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    keys = _keys(rgb)
    table = _keys(palette)
    order = np.argsort(table)
    pos = np.clip(np.searchsorted(table[order], keys), 0, len(table) - 1)
    found = table[order][pos] == keys
    if not found.all():
        bad, counts = np.unique(keys[~found], return_counts=True)
        shown = ", ".join(
            f"#{k:06x} ({c} px)"
            for k, c in sorted(zip(bad.tolist(), counts.tolist(), strict=True), key=lambda x: -x[1])[:5]
        )
        raise TaskError(
            f"the semantic map has {len(bad)} colour(s) that are not in the palette of {len(palette)} "
            f"classes: {shown}{' ...' if len(bad) > 5 else ''} (anti-aliased or resized maps blend "
            "colours: use an unresampled map)"
        )
    return order[pos].astype(np.int64)


def check_class_ids(class_map: np.ndarray, n_classes: int) -> None:
    """Raise :class:`TaskError` naming the ids outside ``0..n_classes-1``."""
    if class_map.size == 0:
        raise TaskError("the semantic map is empty")
    lo, hi = int(class_map.min()), int(class_map.max())
    if lo >= 0 and hi < n_classes:
        return
    bad = np.unique(class_map[(class_map < 0) | (class_map >= n_classes)])
    shown = ", ".join(str(v) for v in bad[:10].tolist()) + (" ..." if len(bad) > 10 else "")
    raise TaskError(
        f"the semantic map holds class ids {shown} outside this model's {n_classes} classes (valid: 0.."
        f"{n_classes - 1}); remap them (e.g. an 'unlabeled' 255) before rendering"
    )


# -- encoding ----------------------------------------------------------------------------------------------
def encode_class_map(encoder: ConditionEncoder, class_map: Tensor) -> Tensor:
    """``encoder(class_map)`` for ``[1, H, W]`` ids; in horizontal strips when the encoder is a 2x2-mean
    :class:`~ldm_sdk.encoders.semantic.SpatialRescaler` (exactly equal: each output row depends only on
    its own block of input rows)."""
    import torch

    from ldm_sdk.encoders.semantic import SpatialRescaler

    height, width = class_map.shape[-2:]
    local = (
        isinstance(encoder, SpatialRescaler)
        and encoder.method in ("bilinear", "area")
        and encoder.multiplier == 0.5
        and encoder.latent_factor is not None
    )
    if not local:
        return encoder(class_map)
    assert isinstance(encoder, SpatialRescaler) and encoder.latent_factor is not None
    f = encoder.latent_factor
    rows = max(f, STRIP_ELEMENTS // max(1, width * encoder.in_channels) // f * f)
    if rows >= height or height % f or width % f:
        return encoder(class_map)
    return torch.cat([encoder(class_map[:, r : r + rows]) for r in range(0, height, rows)], dim=-2)


# -- the task ----------------------------------------------------------------------------------------------
class Semantic(BaseTask[SemanticRequest]):
    """``semantic(SemanticRequest(semantic_map=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "semantic"
    request_type: ClassVar[type[TaskRequest]] = SemanticRequest

    def run(
        self, request: SemanticRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        import torch

        from ldm_sdk.tasks.manifest import input_record
        from ldm_sdk.tasks.runner import Run

        run = Run.start(self.name, request, runtime, inputs, callback)
        refuse_guidance(run, "the semantic map")
        bundle = run.bundle
        encoder = concat_encoder(run, "semantic", "a semantic-map")
        extra = run.inputs.extra
        palette_source = extra.get("palette", request.palette)
        palette = read_palette(palette_source) if palette_source is not None else None
        source = extra.get("semantic_map", request.semantic_map)
        if source is None:
            raise TaskError(
                "the semantic task needs a semantic map (--map FILE, or inputs.extra['semantic_map'])"
            )
        class_map = read_class_map(source, palette)
        path = source if isinstance(source, str | os.PathLike) else None
        run.records.append(input_record("semantic_map", class_map, path))
        n_classes = int(getattr(encoder, "in_channels", 0)) or int(class_map.max()) + 1
        check_class_ids(class_map, n_classes)
        fitted = run.fit_input(class_map, request.fit, what="semantic map")
        f = bundle.downsampling_factor
        latent_hw = (fitted.shape[0] // f, fitted.shape[1] // f)
        ids = torch.from_numpy(np.ascontiguousarray(fitted))[None].to(run.device)
        with torch.inference_mode():
            concat = encode_class_map(encoder, ids)
        if tuple(concat.shape[-2:]) != latent_hw:
            raise TaskError(
                f"the semantic encoder shrinks the map to {tuple(concat.shape[-2:])}, not the latent size "
                f"{latent_hw} of this model (latent factor {f}): encoder and model do not match"
            )
        guided = concat_conditioning(run, concat, "semantic map")
        latents, images = render(run, request, guided, latent_hw)
        run.extra["classes"] = n_classes
        return run.finish(run.unfit(images), latents)


semantic = Semantic()
