"""The layout task on a tiny random-weight layout-to-image model (LayoutEncoder with one layer, 6 classes,
4 objects): parsing, class names, the class count, guidance, sizes, tiling, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ldm_sdk import cli
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks.base import TaskError, TaskInputs
from ldm_sdk.tasks.layout import LayoutRequest, layout, parse_layout, read_class_names
from ldm_sdk.tasks.manifest import read_manifest, replay
from tests.tasks.tiny_large_models import LAYOUT_CLASSES, save_tiny

NAMES = ["person", "dog", "car", "tree", "house", "boat"]
SCENE = [{"class": "dog", "box": [0.1, 0.5, 0.4, 0.9]}, {"class_id": 3, "box": [0.6, 0.1, 0.9, 0.8]}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("layout", tmp_path_factory.mktemp("layout"))


def _render(model: Path, runtime: Runtime, data: Any = SCENE, **kw: Any):  # type: ignore[no-untyped-def]
    extra: dict[str, Any] = {"layout": data, "classes": kw.pop("names", NAMES)}
    request = LayoutRequest(model=str(model), steps=kw.pop("steps", 2), **kw)
    return layout(request, runtime, inputs=TaskInputs(extra=extra))


# -- parsing -------------------------------------------------------------------------------------------------
def test_parse_names_ids_crop_and_group() -> None:
    data = {
        "objects": [*SCENE, {"class": 5, "box": [0, 0, 1, 1], "group_of": True}],
        "crop": [0, 0, 0.5, 0.5],
    }
    objects, crop = parse_layout(data, NAMES)
    assert [(o.class_id, o.group_of) for o in objects] == [(1, False), (3, False), (5, True)]
    assert objects[0].box == (0.1, 0.5, 0.4, 0.9) and crop == (0.0, 0.0, 0.5, 0.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"class_id": 1, "box": [0, 0, 1, 1]}, "got keys"),
        ("dog", "must be a JSON list of objects"),
        ([{"class_id": 1}], r"layout object 0: 'box' \[x0, y0, x1, y1\] .* is missing"),
        ([{"class_id": 1, "box": [0, 0, 1]}], "a box is \\[x0, y0, x1, y1\\]"),
        ([{"class_id": 1, "box": [0, 0, 1.5, 1]}], "must lie in 0..1"),
        ([{"class_id": 1, "box": [0.5, 0, 0.2, 1]}], "x1 > x0"),
        ([{"class_id": 1, "class": "dog", "box": [0, 0, 1, 1]}], "exactly one of 'class_id'"),
        ([{"class": "dgo", "box": [0, 0, 1, 1]}], "unknown class name 'dgo' \\(did you mean 'dog'\\?\\)"),
        ([{"class_id": "dog", "box": [0, 0, 1, 1]}], "must be an integer id"),
        ([{"class_id": 1, "box": [0, 0, 1, 1], "colour": "red"}], "unknown key\\(s\\) \\['colour'\\]"),
        ([{"class_id": 1, "box": [0, 0, 1, 1], "group_of": "yes"}], "'group_of' must be true or false"),
    ],
)
def test_malformed_layouts_are_explained(data: Any, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        parse_layout(data, NAMES)


def test_class_names_files(tmp_path: Path) -> None:
    txt = tmp_path / "classes.txt"
    txt.write_text("\n".join(NAMES) + "\n")
    as_json = tmp_path / "classes.json"
    as_json.write_text(json.dumps(NAMES))
    assert read_class_names(str(txt)) == NAMES == read_class_names(str(as_json))
    with pytest.raises(TaskError, match="'dog' appears more than once"):
        read_class_names(["dog", "Dog"])
    with pytest.raises(TaskError, match="entry 1"):
        read_class_names(["dog", ""])


# -- the task ------------------------------------------------------------------------------------------------
def test_renders_the_training_size_by_default_and_seeds_are_deterministic(
    model: Path, runtime: Runtime
) -> None:
    a = _render(model, runtime, seed=3)
    b = _render(model, runtime, seed=3)
    c = _render(model, runtime, seed=4)
    assert a.images[0].shape == (32, 32, 3)
    assert np.array_equal(a.images[0], b.images[0]) and not np.array_equal(a.images[0], c.images[0])
    extra = a.manifest.extra["layout"]
    assert extra["n_object_classes"] == LAYOUT_CLASSES
    assert [o["class_id"] for o in extra["objects"]] == [1, 3]
    assert [r.role for r in a.manifest.inputs] == ["layout"]


def test_the_layout_conditions_the_image(model: Path, runtime: Runtime) -> None:
    a = _render(model, runtime, seed=3)
    b = _render(model, runtime, [{"class_id": 0, "box": [0.0, 0.0, 0.3, 0.3]}], seed=3)
    assert not np.array_equal(a.images[0], b.images[0])


def test_guidance_against_the_empty_layout(model: Path, runtime: Runtime) -> None:
    plain = _render(model, runtime, seed=3)
    guided = _render(model, runtime, seed=3, guidance=3.0)
    assert guided.manifest.guidance == 3.0 and plain.manifest.guidance == 1.0
    assert not np.array_equal(plain.images[0], guided.images[0])


def test_larger_non_square_whole_and_tiled(model: Path, runtime: Runtime) -> None:
    whole = _render(model, runtime, seed=1, width=96, height=64)
    tiled = _render(model, runtime, seed=1, width=96, height=64, tile=64, overlap=32)
    assert whole.images[0].shape == tiled.images[0].shape == (64, 96, 3)
    assert tiled.manifest.extra["tiling"]["unet_tile"] == [16, 16]
    assert whole.latents is not None and tiled.latents is not None
    # every window reads the same layout tokens; the tiny UNet's self-attention spans its window, not the
    # whole latent: relative L2 to whole measured 0.034-0.047 over seeds 1-3 (0.17-0.18 with 8x8 windows)
    assert float((tiled.latents - whole.latents).norm() / whole.latents.norm()) < 0.08


def test_the_class_count_must_be_known_and_consistent(model: Path, runtime: Runtime) -> None:
    ids_only = [{"class_id": 2, "box": [0.1, 0.1, 0.9, 0.9]}]
    with pytest.raises(TaskError, match=r"does not say how many object classes .* \(--n-classes\)"):
        _render(model, runtime, ids_only, names=None)
    assert _render(model, runtime, ids_only, names=None, n_object_classes=LAYOUT_CLASSES).images
    with pytest.raises(TaskError, match="names 6 classes but n_object_classes is 7"):
        _render(model, runtime, n_object_classes=7)
    with pytest.raises(TaskError, match=r"class_id 9 out of range; valid: 0..5"):
        _render(model, runtime, [{"class_id": 9, "box": [0, 0, 1, 1]}])


def test_too_many_objects_and_bad_sizes(model: Path, runtime: Runtime) -> None:
    five = [{"class_id": 1, "box": [0.1 * i, 0.1, 0.1 * i + 0.1, 0.5]} for i in range(5)]
    with pytest.raises(TaskError, match="5 objects given; this layout model takes at most 4"):
        _render(model, runtime, five)
    with pytest.raises(TaskError, match=r"output size 50x32 .* not a multiple of 8"):
        _render(model, runtime, width=50, height=32)


def test_replay_from_files(model: Path, runtime: Runtime, tmp_path: Path) -> None:
    spec, names = tmp_path / "layout.json", tmp_path / "classes.txt"
    spec.write_text(json.dumps(SCENE))
    names.write_text("\n".join(NAMES))
    request = LayoutRequest(model=str(model), steps=2, seed=9, layout=str(spec), classes=str(names))
    result = layout(request, runtime)
    (out,) = result.save(tmp_path / "out.png")
    assert np.array_equal(replay(read_manifest(out), runtime).images[0], result.images[0])


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_layout(commands: None, model: Path, tmp_path: Path) -> None:
    spec = tmp_path / "layout.json"
    spec.write_text(json.dumps([{"class_id": 2, "box": [0.2, 0.2, 0.8, 0.8]}]))
    out = tmp_path / "out.png"
    argv = ["layout", str(spec), "--n-classes", str(LAYOUT_CLASSES), "--model", str(model), "--steps", "2"]
    assert cli.main([*argv, "-W", "48", "-H", "32", "--cfg", "2", "--seed", "1", "-q", "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (48, 32)
    assert read_manifest(out).guidance == 2.0


def test_cli_layout_malformed_json_is_one_line_and_writes_nothing(
    commands: None, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "layout.json"
    spec.write_text('[{"class_id": 2, "box": [0.2, 0.2, 0.8, 0.8]}')  # missing ]
    out = tmp_path / "out.png"
    argv = [
        "layout",
        str(spec),
        "--n-classes",
        "6",
        "--model",
        str(model),
        "--steps",
        "1",
        "-q",
        "-o",
        str(out),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("ldm-sdk layout: error: layout file")
        and "is not valid JSON" in err
        and "line 1" in err
    )
    assert not out.exists()
