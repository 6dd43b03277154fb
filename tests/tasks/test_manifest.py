"""Manifests in PNGs and sidecars, and bit-exact replays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_sdk.checkpoints.safe_load import file_sha256
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import InpaintRequest, TaskError, TaskInputs, Txt2ImgRequest
from ldm_sdk.tasks.images import array_sha256, read_image, save_outputs
from ldm_sdk.tasks.manifest import Manifest, read_manifest, replay

txt2img, inpaint = get_task("txt2img"), get_task("inpaint")


def _inpaint_files(folder: Path) -> tuple[Path, Path]:
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:14, 8:30] = 255
    Image.fromarray(image).save(folder / "photo.png")
    Image.fromarray(mask).save(folder / "hole.png")
    return folder / "photo.png", folder / "hole.png"


def test_png_and_sidecar_hold_the_item_manifest(
    runtime: Runtime, model_files: dict[str, Path], tmp_path: Path
) -> None:
    request = Txt2ImgRequest(
        model=str(model_files["txt"]), prompt="a cat", seed=5, batch=2, width=32, height=32, steps=2
    )
    result = txt2img(request, runtime)
    paths = save_outputs(result, tmp_path / "cat.png")
    assert paths == [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cat-0.json",
        "cat-0.png",
        "cat-1.json",
        "cat-1.png",
    ]
    for i, path in enumerate(paths):
        assert np.array_equal(read_image(path), result.images[i])
        from_png = read_manifest(path)
        from_json = read_manifest(path.with_suffix(".json"))
        assert from_png == from_json
        assert from_png.batch_index == i and from_png.seeds == [5 + i] and from_png.request["batch"] == 2
        assert from_png.item_request()["seed"] == 5 + i and from_png.item_request()["batch"] == 1
    m = read_manifest(paths[0])
    assert m.model.sha256 == file_sha256(model_files["txt"])
    assert m.model.config == json.loads(result.manifest.model.model_dump_json())["config"]
    assert m.timesteps == [float(t) for t in result.manifest.timesteps] and len(m.timesteps) == 2


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="manifest file not found"):
        read_manifest(tmp_path / "none.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "plain.png")
    with pytest.raises(TaskError, match="holds no ldm-sdk manifest"):
        read_manifest(tmp_path / "plain.png")
    (tmp_path / "bad.json").write_text('{"task": "txt2img"}')
    with pytest.raises(TaskError, match="invalid ldm-sdk manifest"):
        read_manifest(tmp_path / "bad.json")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01\xff")
    with pytest.raises(TaskError, match="neither a PNG"):
        read_manifest(tmp_path / "junk.bin")


def test_replay_txt2img_batch_item_is_bit_exact(
    runtime: Runtime, model_files: dict[str, Path], tmp_path: Path
) -> None:
    request = Txt2ImgRequest(
        model=str(model_files["txt"]),
        prompt="a house",
        seed=9,
        batch=3,
        width=32,
        height=32,
        steps=3,
        sampler="euler_ancestral",
    )
    result = txt2img(request, runtime)
    paths = save_outputs(result, tmp_path / "house.png")
    again = replay(paths[2], runtime)
    assert len(again.images) == 1 and np.array_equal(again.images[0], read_image(paths[2]))
    assert again.manifest.seeds == [11]
    other = replay(paths[1], runtime)
    assert not np.array_equal(other.images[0], again.images[0])


def test_replay_inpaint_from_files(runtime: Runtime, model_files: dict[str, Path], tmp_path: Path) -> None:
    photo, hole = _inpaint_files(tmp_path)
    request = InpaintRequest(
        model=str(model_files["sd_inpaint"]),
        image=str(photo),
        mask=str(hole),
        prompt="a hat",
        steps=3,
        grow=2,
        feather=1.0,
    )
    result = inpaint(request, runtime)
    (out,) = save_outputs(result, tmp_path / "out.png")
    manifest = read_manifest(out)
    roles = {r.role: r for r in manifest.inputs}
    assert roles["image"].pixels_sha256 == array_sha256(read_image(photo))
    assert roles["image"].file_sha256 == file_sha256(photo) and roles["mask"].file_sha256 == file_sha256(hole)
    assert np.array_equal(replay(out, runtime).images[0], read_image(out))

    # the inputs moved: found by name in inputs_dir
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(photo, moved / photo.name)
    shutil.move(hole, moved / hole.name)
    with pytest.raises(TaskError, match="image file was not found"):
        replay(out, runtime)
    assert np.array_equal(replay(out, runtime, inputs_dir=moved).images[0], read_image(out))

    # a different image under the same name is refused
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(moved / photo.name)
    with pytest.raises(TaskError, match="differs from the recorded one"):
        replay(out, runtime, inputs_dir=moved)


def test_replay_refuses_another_model(runtime: Runtime, model_files: dict[str, Path], tmp_path: Path) -> None:
    result = txt2img(
        Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", width=32, height=32, steps=2), runtime
    )
    manifest = result.manifest.for_item(0)
    with pytest.raises(TaskError, match="is not the one the run used"):
        replay(manifest, runtime, model=model_files["sd_inpaint"])
    data = manifest.model_dump()
    data["model"]["path"] = str(tmp_path / "gone.safetensors")
    data["request"]["model"] = str(tmp_path / "gone.safetensors")
    with pytest.raises(TaskError, match="was not found"):
        replay(Manifest.model_validate(data), runtime)
    copy = tmp_path / "copy" / "gone.safetensors"
    copy.parent.mkdir()
    shutil.copy(model_files["txt"], copy)
    found = replay(Manifest.model_validate(data), runtime, inputs_dir=copy.parent)
    assert np.array_equal(found.images[0], result.images[0])


def test_replay_in_memory_inputs(runtime: Runtime, model_files: dict[str, Path]) -> None:
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[:16] = 1
    request = InpaintRequest(model=str(model_files["txt"]), prompt="x", steps=2)
    result = inpaint(request, runtime, inputs=TaskInputs(image=image, mask=mask))
    manifest = result.manifest.for_item(0)
    with pytest.raises(TaskError, match="given in memory"):
        replay(manifest, runtime)
    again = replay(manifest, runtime, inputs=TaskInputs(image=image, mask=mask))
    assert np.array_equal(again.images[0], result.images[0])
    with pytest.raises(TaskError, match="differs from the recorded one"):
        replay(manifest, runtime, inputs=TaskInputs(image=image[::-1].copy(), mask=mask))


def test_save_outputs_writes_nothing_on_failure(
    runtime: Runtime, model_files: dict[str, Path], tmp_path: Path
) -> None:
    result = txt2img(
        Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", batch=2, width=32, height=32, steps=1),
        runtime,
    )
    result.images[1] = np.zeros((4, 4, 7), np.uint8)  # not writable as PNG
    with pytest.raises(Exception):  # noqa: B017 - PIL's own error
        save_outputs(result, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
