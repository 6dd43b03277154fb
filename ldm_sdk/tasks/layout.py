"""Layout to image (Rombach et al. 2022, Sec. 4.3.1): boxes with object classes -> an image (cross-attention).

The layout is tokenized like taming-transformers' ``ObjectsBoundingBoxConditionalBuilder`` and embedded by the
model's jointly trained transformer (:class:`~ldm_sdk.encoders.layout.LayoutEncoder`); the UNet reads it
through cross-attention, so the tokens are the same for every latent window and any output size works
(whole, or through blended windows: :mod:`ldm_sdk.tasks.tiled`).

Layout JSON (``layout``: a file, or ``TaskInputs.extra["layout"]`` as the parsed value): a list of objects,
or ``{"objects": [...], "crop": [x0, y0, x1, y1]}``. An object is
``{"class_id": 3, "box": [x0, y0, x1, y1]}`` or ``{"class": "Dog", "box": [...]}`` (a name from the
``classes`` file: JSON list or one name per line, line ``i`` = class ``i``), optionally ``"group_of": true``.
Boxes are relative to the image: 0 = left / top, 1 = right / bottom.

The tokenizer needs the dataset's number of object classes, which the original config does not carry:
``n_object_classes`` from the request, else the config's cond stage params, else the length of the
``classes`` file. Guidance (off by default) uses the empty layout as the unconditional input; the released
layout2img model was not trained with layout dropout, so guidance there is an extrapolation.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from ldm_sdk.tasks.base import BaseTask, TaskError, TaskInputs, TaskRequest, TaskResult
from ldm_sdk.tasks.tiled import TiledRequest, render

if TYPE_CHECKING:
    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.encoders.layout import Box, LayoutObject
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback
    from ldm_sdk.tasks.runner import Run

__all__ = ["Layout", "LayoutRequest", "layout", "parse_layout", "read_class_names"]

OBJECT_KEYS = ("class_id", "class", "box", "group_of")
_ENCODER_ATTR = "_ldm_sdk_layout_encoder"


class LayoutRequest(TiledRequest):
    """Render ``layout`` (see the module doc) at ``width`` x ``height`` pixels (None: the model's training
    size); ``classes`` names the object classes; ``n_object_classes`` when the config does not say it."""

    task: ClassVar[str] = "layout"
    layout: str | None = None
    classes: str | None = None
    n_object_classes: int | None = Field(None, ge=1, le=100000)
    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)


# -- parsing -------------------------------------------------------------------------------------------
def read_class_names(source: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names (index = class id) from a JSON list file, a text file with one name per line, or a list."""
    where = "classes"
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        where = f"classes file {path}"
        if not path.is_file():
            raise TaskError(f"classes file not found: {path} (a JSON list, or one class name per line)")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                source = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{where} is not valid JSON: {exc}") from None
        else:
            source = [line.strip() for line in text.rstrip("\n").splitlines()]
    if not isinstance(source, Sequence) or isinstance(source, str) or not source:
        raise TaskError(f"{where} must be a non-empty list of class names (index = class id)")
    names = list(source)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise TaskError(f"{where}: entry {i} ({name!r}) is not a class name")
    folded = [n.strip().casefold() for n in names]
    if len(set(folded)) != len(folded):
        dup = next(n for n in names if folded.count(n.strip().casefold()) > 1)
        raise TaskError(f"{where}: the class name {dup!r} appears more than once")
    return [n.strip() for n in names]


def load_layout_json(source: str | os.PathLike[str]) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise TaskError(f"layout file not found: {path} (a JSON list of {{class_id, box}} objects)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TaskError(f"layout file {path} is not UTF-8 text (a JSON file is expected)") from None
    except json.JSONDecodeError as exc:
        raise TaskError(
            f"layout file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


def parse_layout(data: Any, names: Sequence[str] | None = None) -> tuple[list[LayoutObject], Box | None]:
    """The objects and the crop of a parsed layout JSON value (see the module doc)."""
    from ldm_sdk.encoders.layout import LayoutObject

    crop: Box | None = None
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - {"objects", "crop"})
        if unknown or "objects" not in data:
            raise TaskError(
                f"a layout object must be {{'objects': [...], 'crop': [x0, y0, x1, y1]}} (crop optional); "
                f"got keys {sorted(data)}"
            )
        if data.get("crop") is not None:
            crop = _box(data["crop"], "layout crop")
        data = data["objects"]
    if not isinstance(data, list):
        raise TaskError(
            f"a layout must be a JSON list of objects like {{'class_id': 3, 'box': [x0, y0, x1, y1]}}; "
            f"got {type(data).__name__}"
        )
    lookup = {n.casefold(): i for i, n in enumerate(names or ())}
    objects = []
    for i, item in enumerate(data):
        what = f"layout object {i}"
        if not isinstance(item, Mapping):
            raise TaskError(
                f"{what}: must be a JSON object with 'class_id' (or 'class') and 'box'; got {item!r}"
            )
        unknown = sorted(set(item) - set(OBJECT_KEYS))
        if unknown:
            raise TaskError(f"{what}: unknown key(s) {unknown}; valid: {', '.join(OBJECT_KEYS)}")
        if ("class_id" in item) == ("class" in item):
            raise TaskError(
                f"{what}: give exactly one of 'class_id' (an integer) or 'class' (a name or integer)"
            )
        if "box" not in item:
            raise TaskError(f"{what}: 'box' [x0, y0, x1, y1] (relative, 0..1) is missing")
        group = item.get("group_of", False)
        if not isinstance(group, bool):
            raise TaskError(f"{what}: 'group_of' must be true or false; got {group!r}")
        objects.append(LayoutObject(_class_id(item, what, names, lookup), _box(item["box"], what), group))
    return objects, crop


def _class_id(item: Mapping[str, Any], what: str, names: Sequence[str] | None, lookup: dict[str, int]) -> int:
    value = item["class_id"] if "class_id" in item else item["class"]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if "class_id" in item or not isinstance(value, str):
        raise TaskError(
            f"{what}: the class must be an integer id{' or a name' if 'class' in item else ''}; got {value!r}"
        )
    if not names:
        raise TaskError(
            f"{what}: class name {value!r} needs the class names (--classes FILE), or use 'class_id'"
        )
    found = lookup.get(value.strip().casefold())
    if found is None:
        close = difflib.get_close_matches(value, list(names), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise TaskError(
            f"{what}: unknown class name {value!r}{hint}; the classes file has {len(names)} names"
        )
    return found


def _box(value: Any, what: str) -> Box:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise TaskError(f"{what}: a box is [x0, y0, x1, y1] (four numbers in 0..1); got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise TaskError(
            f"{what}: box coordinates must lie in 0..1 (relative to the image); got {list(value)}"
        )
    if not (x1 > x0 and y1 > y0):
        raise TaskError(f"{what}: a box needs x1 > x0 and y1 > y0; got {list(value)}")
    return x0, y0, x1, y1


# -- the encoder -------------------------------------------------------------------------------------
def layout_encoder(run: Run, n_classes: int | None) -> ConditionEncoder:
    """``inputs.encoder``, else the model's layout encoder built with ``n_object_classes`` (cached on the
    bundle per device, dtype and class count)."""
    if run.inputs.encoder is not None:
        return run.inputs.encoder
    from ldm_sdk.encoders.from_bundle import build_cond_stage

    bundle = run.bundle
    configured = bundle.config.cond_stage.params.get("n_object_classes") if bundle.config.cond_stage else None
    if configured is not None and n_classes is not None and int(configured) != n_classes:
        raise TaskError(
            f"the model's config says n_object_classes={configured}, the request {n_classes}; leave it unset"
        )
    if configured is None and n_classes is None:
        raise TaskError(
            "the layout model's config does not say how many object classes its tokenizer has: pass "
            "n_object_classes (--n-classes) or the class names (--classes FILE, one per class)"
        )
    key = (run.device, run.dtype, n_classes)
    cached = bundle.__dict__.get(_ENCODER_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]  # type: ignore[no-any-return]
    params = {} if configured is not None else {"n_object_classes": n_classes}
    registry = run.runtime.registries.condition_encoders
    encoder = build_cond_stage(bundle, registry, params=params, device=run.device, dtype=run.dtype)
    if encoder is None:
        raise TaskError(f"model {bundle.family!r} has no condition encoder: it cannot render a layout")
    object.__setattr__(bundle, _ENCODER_ATTR, (key, encoder))  # not a submodule: state_dict unchanged
    return encoder


# -- the task ----------------------------------------------------------------------------------------------
class Layout(BaseTask[LayoutRequest]):
    """``layout(LayoutRequest(layout=..., model=...), runtime) -> TaskResult``."""

    name: ClassVar[str] = "layout"
    request_type: ClassVar[type[TaskRequest]] = LayoutRequest

    def run(
        self, request: LayoutRequest, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        import numpy as np
        import torch

        from ldm_sdk.tasks.manifest import input_record
        from ldm_sdk.tasks.runner import Guided, Run

        run = Run.start(self.name, request, runtime, inputs, callback)
        extra = run.inputs.extra
        names_source = extra.get("classes", request.classes)
        names = read_class_names(names_source) if names_source is not None else None
        n_classes = request.n_object_classes
        if names is not None and n_classes is not None and len(names) != n_classes:
            raise TaskError(
                f"the classes file names {len(names)} classes but n_object_classes is {n_classes}"
            )
        encoder = layout_encoder(run, n_classes if n_classes is not None else (len(names) if names else None))
        tokenizer = getattr(encoder, "tokenizer", None)
        if encoder.modality != "layout" or tokenizer is None:
            raise TaskError(
                f"the layout task needs a layout encoder (modality 'layout'); got {encoder.modality!r}"
            )
        if names is not None and len(names) != tokenizer.n_object_classes:
            raise TaskError(
                f"the classes file names {len(names)} classes; this layout model has "
                f"{tokenizer.n_object_classes}"
            )
        source = extra.get("layout", request.layout)
        if source is None:
            raise TaskError("the layout task needs a layout (--layout FILE.json, or inputs.extra['layout'])")
        path = source if isinstance(source, str | os.PathLike) else None
        data = load_layout_json(path) if path is not None else source
        objects, crop = parse_layout(data, names)
        try:
            tokens = tokenizer.encode(objects, crop)
        except ValueError as exc:
            raise TaskError(f"invalid layout: {exc}") from None
        run.records.append(input_record("layout", np.asarray(tokens.numpy()), path))
        guidance = 1.0 if request.guidance is None else float(request.guidance)
        with torch.inference_mode():
            cond = encoder.conditioning(encoder(tokens[None]))
            uncond = encoder.conditioning(encoder.unconditional(1)) if guidance != 1.0 else None
        run.guidance = guidance
        guided = Guided(cond=cond, uncond=uncond, guidance=guidance)
        height, width = run.output_size(request.height, request.width)
        _, _, h, w = run.latent_shape(height, width)
        latents, images = render(run, request, guided, (h, w))
        run.extra["layout"] = {
            "objects": [
                {"class_id": o.class_id, "box": list(o.box), "group_of": o.group_of} for o in objects
            ],
            "crop": list(crop) if crop is not None else None,
            "n_object_classes": tokenizer.n_object_classes,
        }
        return run.finish(images, latents)


layout = Layout()
