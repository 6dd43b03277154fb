"""ImageFolderDataset on a folder tree made here: sidecars, class folders, crops, flips and broken files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sdk.training.data.folder import ImageFolderDataset


def _save(path: Path, array: np.ndarray, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    _save(tmp_path / "cats" / "a.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "cats" / "a.txt").write_text("  a grey cat\n", encoding="utf-8")
    _save(tmp_path / "dogs" / "deep" / "b.jpg", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "dogs" / "deep" / "b.json").write_text(json.dumps({"caption": "a dog", "label": 5}))
    (tmp_path / "dogs" / "deep" / "b.txt").write_text("loses to the json caption")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)  # an opaque red square on a transparent canvas
    _save(tmp_path / "dogs" / "c.PNG", rgba, "RGBA")
    (tmp_path / "dogs" / ".hidden.png").write_bytes(b"not even an image")
    (tmp_path / "dogs" / "notes.md").write_text("ignored: not an image extension")
    return tmp_path


def test_items_captions_and_subfolder_labels(tree: Path) -> None:
    ds = ImageFolderDataset(tree, 16)
    assert [f.as_posix() for f in ds.files] == ["cats/a.png", "dogs/c.PNG", "dogs/deep/b.jpg"]
    assert ds.class_names == ["cats", "dogs"]
    items = [ds[i] for i in range(len(ds))]
    assert [it["class_label"] for it in items] == [0, 1, 1]
    assert [it["caption"] for it in items] == ["a grey cat", "", "a dog"]
    assert [it["path"] for it in items] == ["cats/a.png", "dogs/c.PNG", "dogs/deep/b.jpg"]
    for it in items:
        assert it["image"].shape == (3, 16, 16) and it["image"].dtype == torch.float32
    # a 16x16 PNG at size 16 is the file's pixels exactly, in [-1, 1]
    raw = np.asarray(Image.open(tree / "cats" / "a.png"), dtype=np.float32)
    assert torch.allclose(items[0]["image"], torch.from_numpy(raw / 127.5 - 1).permute(2, 0, 1), atol=1e-6)
    # transparency is composited on white: red square inside, white (1.0) around it
    c = items[1]["image"]
    assert torch.allclose(c[:, 8, 8], torch.tensor([1.0, -1.0, -1.0])) and (c[:, 0, 0] == 1).all()


def test_sidecar_labels_crop_and_flip(tree: Path) -> None:
    ds = ImageFolderDataset(tree, (8, 12), labels="sidecar", captions="none", crop="center")
    assert [ds[i]["class_label"] for i in range(3)] == [-1, -1, 5]
    assert all(ds[i]["caption"] == "" for i in range(3))
    assert ds[2]["image"].shape == (3, 8, 12)
    # flip: mirrored or not, item by item; with a fixed seed, reproducible
    flip = ImageFolderDataset(tree, 16, flip=True, crop="random")
    plain = ImageFolderDataset(tree, 16)[0]["image"]
    torch.manual_seed(3)
    seen = [flip[0]["image"] for _ in range(12)]
    assert any(torch.equal(s, plain) for s in seen) and any(torch.equal(s, plain.flip(-1)) for s in seen)
    torch.manual_seed(3)
    assert torch.equal(flip[0]["image"], seen[0])


def test_string_sidecar_labels_and_fixed_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name, label in (("x", "zebra"), ("y", "ant"), ("z", None)):
        _save(tmp_path / f"{name}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        if label:
            (tmp_path / f"{name}.json").write_text(json.dumps({"label": label}))
    ds = ImageFolderDataset(tmp_path, 8, labels="sidecar")
    assert ds.class_names == ["ant", "zebra"] and ds.class_labels == [1, 0, -1]
    with pytest.raises(ValueError, match="not in class_names"):
        ImageFolderDataset(tmp_path, 8, labels="sidecar", class_names=["ant"])
    with pytest.raises(ValueError, match="inside a class folder"):
        ImageFolderDataset(tmp_path, 8, labels="subfolders")


def test_empty_missing_and_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images with extensions"):
        ImageFolderDataset(tmp_path / "empty", 8)
    root = tmp_path / "data"
    _save(root / "k" / "good.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    (root / "k" / "broken.png").write_bytes(b"\x89PNG but truncated")
    with pytest.raises(OSError, match=r"cannot read image .*broken\.png.*on_error='skip'"):
        ImageFolderDataset(root, 8)[0]
    skip = ImageFolderDataset(root, 8, on_error="skip")
    with caplog.at_level(logging.WARNING):
        item = skip[0]  # broken.png sorts first: the next readable item comes back
    assert item["path"] == "k/good.png" and "broken.png" in caplog.text
    with pytest.raises(ValueError, match="valid modes"):
        ImageFolderDataset(root, 8, crop="zoom")
