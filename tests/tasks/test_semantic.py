"""The semantic task on a tiny random-weight semantic-synthesis model (5 classes, "trained" at 256x256):
map formats, class-id checks, rendering larger and non-square, tiled vs whole, strips, CLI.

Tiled vs whole (384x256 map, 2 DDIM steps, 32x32-latent windows overlapping by 8): relative L2 of the final
latents about 0.035 (GroupNorm statistics and zero padding per window) -- asserted below 0.08.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sdk import cli
from ldm_sdk.encoders.semantic import SpatialRescaler
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import semantic as semantic_module
from ldm_sdk.tasks.base import TaskError, TaskInputs
from ldm_sdk.tasks.semantic import SemanticRequest, encode_class_map, read_class_map, read_palette, semantic
from tests.tasks.tiny_large_models import SEMANTIC_CLASSES, save_tiny

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], "#ffff00"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("semantic", tmp_path_factory.mktemp("semantic"))


def _scene(height: int = 32, width: int = 48) -> np.ndarray:
    m = np.zeros((height, width), np.int64)
    m[:, width // 2 :] = 2
    m[height // 2 :, :] = 4
    m[height // 8 : height // 3, width // 8 : width // 2] = 1
    m[0, 0] = 3
    return m


def _render(model: Path, runtime: Runtime, source: object = None, **kw: object):  # type: ignore[no-untyped-def]
    extra = {} if source is None else {"semantic_map": source}
    if "palette_value" in kw:
        extra["palette"] = kw.pop("palette_value")
    request = SemanticRequest(model=str(model), steps=kw.pop("steps", 2), **kw)  # type: ignore[arg-type]
    return semantic(request, runtime, inputs=TaskInputs(extra=extra))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- reading maps --------------------------------------------------------------------------------------------
def test_index_png_palette_png_and_colour_map_read_the_same_ids(tmp_path: Path) -> None:
    ids = _scene()
    grey = tmp_path / "ids.png"
    Image.fromarray(ids.astype(np.uint8), mode="L").save(grey)
    indexed = Image.fromarray(ids.astype(np.uint8), mode="P")
    indexed.putpalette([200, 10, 10] * 256)  # the palette colours of a P image are not the ids
    indexed.save(tmp_path / "ids-p.png")
    colours = read_palette(PALETTE)
    rgb = tmp_path / "colours.png"
    Image.fromarray(colours[ids]).save(rgb)
    (tmp_path / "palette.json").write_text(json.dumps(PALETTE))
    assert np.array_equal(read_class_map(str(grey)), ids)
    assert np.array_equal(read_class_map(str(tmp_path / "ids-p.png")), ids)
    assert np.array_equal(read_class_map(str(rgb), read_palette(str(tmp_path / "palette.json"))), ids)
    assert np.array_equal(read_class_map(np.repeat(ids[..., None].astype(np.uint8), 3, axis=2)), ids)


@pytest.mark.parametrize(
    ("source", "palette", "message"),
    [
        (np.dstack([np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8), np.zeros((8, 8), np.uint8)]), None,
         "colour image: give its palette"),
        (np.full((8, 8, 3), 7, np.uint8), PALETTE,
         r"1 colour\(s\) that are not in the palette of 5 classes: #070707"),
        (np.full((8, 8), 0.5), None, "must be integers"),
        (np.zeros((2, 8, 8), np.int64), None, "must be H x W class ids"),
    ],
)  # fmt: skip
def test_unreadable_maps_are_explained(source: np.ndarray, palette: list | None, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TaskError, match=message):
        read_class_map(source, read_palette(palette) if palette is not None else None)


@pytest.mark.parametrize(
    ("palette", "message"),
    [
        ([[0, 0, 0], [0, 0, 0]], "classes 0 and 1 have the same colour"),
        ([[0, 0, 256]], "entry 0"),
        ([], "non-empty"),
    ],
)
def test_bad_palettes_are_explained(palette: list, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TaskError, match=message):
        read_palette(palette)


def test_strip_encoding_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    encoder = SpatialRescaler(n_stages=2, in_channels=SEMANTIC_CLASSES, out_channels=3).eval()
    ids = torch.from_numpy(_scene(64, 40))[None]
    whole = encoder(ids)
    monkeypatch.setattr(semantic_module, "STRIP_ELEMENTS", 8 * 40 * SEMANTIC_CLASSES)  # strips of 8 rows
    strips = encode_class_map(encoder, ids)
    assert torch.equal(strips, whole)


# -- the task ------------------------------------------------------------------------------------------------
def test_renders_at_the_map_size_and_seeds_are_deterministic(model: Path, runtime: Runtime) -> None:
    a = _render(model, runtime, _scene(), seed=4)
    b = _render(model, runtime, _scene(), seed=4)
    c = _render(model, runtime, _scene(), seed=5)
    assert a.images[0].shape == (32, 48, 3)
    assert np.array_equal(a.images[0], b.images[0]) and not np.array_equal(a.images[0], c.images[0])
    assert a.manifest.task == "semantic" and a.manifest.extra["classes"] == SEMANTIC_CLASSES
    assert [r.role for r in a.manifest.inputs] == ["semantic_map"]


def test_the_map_conditions_the_image(model: Path, runtime: Runtime) -> None:
    other = _scene()
    other[:, :] = 3
    a = _render(model, runtime, _scene(), seed=4)
    b = _render(model, runtime, other, seed=4)
    assert not np.array_equal(a.images[0], b.images[0])


def test_a_256_model_renders_a_larger_non_square_image_whole_and_tiled(model: Path, runtime: Runtime) -> None:
    ids = _scene(256, 384)  # the tiny model's training size is 256x256 (image_size 64 at f4)
    whole = _render(model, runtime, ids, seed=1)
    assert whole.images[0].shape == (256, 384, 3)
    assert whole.latents is not None and tuple(whole.latents.shape) == (1, 3, 64, 96)
    tiled = _render(model, runtime, ids, seed=1, tile=128, overlap=32)
    assert tiled.manifest.extra["tiling"]["unet_tile"] == [32, 32]
    assert tiled.images[0].shape == (256, 384, 3)
    assert tiled.latents is not None and _rel(tiled.latents, whole.latents) < 0.08


def test_a_palette_colour_map_renders_like_its_ids(model: Path, runtime: Runtime) -> None:
    ids = _scene()
    by_ids = _render(model, runtime, ids, seed=2)
    by_colour = _render(model, runtime, read_palette(PALETTE)[ids], seed=2, palette_value=PALETTE)
    assert np.array_equal(by_ids.images[0], by_colour.images[0])


def test_class_ids_out_of_range_are_named(model: Path, runtime: Runtime) -> None:
    ids = _scene()
    ids[3, 3], ids[4, 4] = 7, 255
    with pytest.raises(TaskError, match=r"class ids 7, 255 outside this model's 5 classes \(valid: 0..4\)"):
        _render(model, runtime, ids)


def test_sizes_off_the_multiple_need_pad_or_crop(model: Path, runtime: Runtime) -> None:
    ids = _scene(30, 45)
    with pytest.raises(TaskError, match=r"semantic map size 45x30 .* not a multiple of 8.*--pad.*--crop"):
        _render(model, runtime, ids)
    assert _render(model, runtime, ids, fit="pad").images[0].shape == (30, 45, 3)
    assert _render(model, runtime, ids, fit="crop").images[0].shape == (24, 40, 3)


def test_missing_map_and_guidance_are_refused(model: Path, runtime: Runtime) -> None:
    with pytest.raises(TaskError, match="needs a semantic map"):
        _render(model, runtime)
    with pytest.raises(TaskError, match="no classifier-free guidance"):
        _render(model, runtime, _scene(), guidance=2.0)


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_semantic_with_a_palette(commands: None, model: Path, tmp_path: Path) -> None:
    colours = tmp_path / "map.png"
    Image.fromarray(read_palette(PALETTE)[_scene(32, 64)]).save(colours)
    palette = tmp_path / "palette.json"
    palette.write_text(json.dumps(PALETTE))
    out = tmp_path / "out.png"
    argv = ["semantic", str(colours), "--palette", str(palette), "--model", str(model), "--steps", "2"]
    assert cli.main([*argv, "--seed", "3", "--device", "cpu", "-q", "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (64, 32)


def test_cli_semantic_bad_ids_is_one_line_and_writes_nothing(
    commands: None, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = tmp_path / "ids.png"
    bad = _scene().astype(np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad, mode="L").save(ids)
    out = tmp_path / "out.png"
    assert cli.main(["semantic", str(ids), "--model", str(model), "--steps", "1", "-q", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ldm-sdk semantic: error: the semantic map holds class ids 9 outside")
    assert not out.exists()
