"""Synthetic scenes: determinism, asset-disjoint splits, and every modality agreeing with the alphas exactly.

Needs the Debian packages fonts-noto-color-emoji and openclipart-png (./test.sh installs them); the asset
index is cached in a temporary folder, so the first dataset of this module scans the assets (~2 s).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_sdk.encoders.degradations import bicubic_downsample
from ldm_sdk.encoders.layout import LayoutTokenizer
from ldm_sdk.training.data import assets as assets_mod
from ldm_sdk.training.data.assets import SCENE_CLASSES, asset_split, load_asset_index
from ldm_sdk.training.data.emoji import emoji_caption, emoji_group
from ldm_sdk.training.data.scenes import SceneDataset, layout_objects


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ldm-cache")


@pytest.fixture(scope="module")
def train(cache: Path) -> SceneDataset:
    return SceneDataset("train", 64, objects=(2, 4), cache_dir=cache, length=100)


def test_vocabulary_is_fixed() -> None:
    assert len(SCENE_CLASSES) == 29 and SCENE_CLASSES[0] == "background"
    assert SCENE_CLASSES[1] == "animals" and SCENE_CLASSES[-1] == "emoji symbol"
    assert len(set(SCENE_CLASSES)) == len(SCENE_CLASSES)


def test_emoji_captions_from_unicode_names() -> None:
    assert emoji_caption([0x1F600]) == "grinning face"
    assert emoji_caption([0x1F34E]) == "red apple"
    assert emoji_caption([0x1F44B, 0x1F3FF]) == "waving hand sign with dark skin tone"
    assert emoji_caption([0x1F1FA, 0x1F1F8]) == "flag US"
    assert emoji_caption([0x1F3F4, 0xE0067, 0xE0062, 0xE0065, 0xE006E, 0xE0067, 0xE007F]) == "flag GB-ENG"
    assert emoji_caption([0x31, 0xFE0F, 0x20E3]) == "keycap 1"
    # modifier-only sequences get no caption
    assert emoji_caption([0x1F3FF]) is None
    assert emoji_caption([0x200D, 0xFE0F]) is None
    assert emoji_caption([0x1F1FA]) is None
    assert emoji_group([0x1F600]) == "emoji face" and emoji_group([0x1F1FA, 0x1F1F8]) == "emoji flag"


def test_items_are_deterministic(train: SceneDataset, cache: Path) -> None:
    a, b = train[7], train[7]
    again = SceneDataset("train", 64, objects=(2, 4), cache_dir=cache, length=100)[7]
    for other in (b, again):
        assert other["caption"] == a["caption"]
        for key in ("image", "boxes", "box_classes", "segmentation", "mask", "lowres"):
            assert torch.equal(other[key], a[key]), key
    assert not torch.equal(train[8]["image"], a["image"])
    # a different seed gives a different scene for the same index
    assert not torch.equal(
        SceneDataset("train", 64, seed=1, cache_dir=cache, length=100)[7]["image"], a["image"]
    )


def test_splits_are_disjoint_by_asset(train: SceneDataset, cache: Path) -> None:
    val = SceneDataset("val", 64, objects=(2, 4), cache_dir=cache, length=20)
    keys_train = {(a.source, a.key) for a in train.assets}
    keys_val = {(a.source, a.key) for a in val.assets}
    everything = {(a.source, a.key) for a in load_asset_index(cache=cache)}
    assert not keys_train & keys_val
    assert keys_train | keys_val == everything
    assert 0.07 < len(keys_val) / len(everything) < 0.13  # val_fraction 0.1
    for source in ("emoji", "clipart"):  # both sources in both splits
        assert any(s == source for s, _ in keys_val) and any(s == source for s, _ in keys_train)
    for i in range(5):  # val scenes draw val assets only
        for obj in val.render(i).objects:
            assert (obj.asset.source, obj.asset.key) in keys_val
            assert asset_split(obj.asset) == "val"


def _tight_box_np(alpha: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(alpha >= 0.5)
    h, w = alpha.shape
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5])
def test_modalities_agree_exactly(train: SceneDataset, index: int) -> None:
    item, scene = train[index], train.render(index)
    n = item["num_objects"]
    assert n == len(scene.objects) and 2 <= n <= 4
    alphas = np.stack([o.alpha.numpy() for o in scene.objects])  # back to front

    # segmentation and instances, recomputed: the topmost object with alpha >= 0.5 wins
    top = np.zeros(alphas.shape[1:], dtype=np.int64)
    for i, a in enumerate(alphas):
        top[a >= 0.5] = i + 1
    classes = np.array([0] + [o.asset.class_id for o in scene.objects])
    assert np.array_equal(item["segmentation"].numpy(), classes[top])
    assert np.array_equal(scene.instances.numpy(), top)

    for i, obj in enumerate(scene.objects):
        # boxes: the tight box of the object's alpha >= 0.5, with its class
        box = item["boxes"][i].tolist()
        assert box == pytest.approx(_tight_box_np(alphas[i]), abs=1e-7)
        assert item["box_classes"][i] == obj.asset.class_id >= 1
        # inside its box, wherever it is on top, the segmentation holds its class
        x0, y0, x1, y1 = (round(v * 64) for v in box)
        region_top = top[y0:y1, x0:x1] == i + 1
        assert (item["segmentation"][y0:y1, x0:x1].numpy()[region_top] == obj.asset.class_id).all()
        # nothing of the object (alpha >= 0.5) lies outside its box
        outside = alphas[i].copy()
        outside[y0:y1, x0:x1] = 0
        assert outside.max() < 0.5
    assert (item["box_classes"][n:] == -1).all() and (item["boxes"][n:] == 0).all()

    # the mask is exactly one object's alpha
    k = item["mask_object"]
    assert 0 <= k < n
    assert torch.equal(item["mask"][0], scene.objects[k].alpha)

    # the caption names every object and the background; the class label is the most visible object's
    for obj in scene.objects:
        assert obj.asset.caption in item["caption"]
    assert item["caption"].endswith(scene.background)
    visible = np.bincount(top.ravel(), minlength=n + 1)[1:]
    assert item["class_label"] == scene.objects[int(np.argmax(visible))].asset.class_id

    # where no object covers a pixel at all, the image is the backdrop; lowres is the bicubic x4 of the image
    bare = torch.from_numpy(alphas.max(axis=0) == 0)
    assert torch.equal(item["image"][:, bare], scene.backdrop[:, bare] * 2 - 1)
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].shape == (3, 64, 64)
    expected = bicubic_downsample(scene.image[None], 4)[0].clamp(0, 1) * 2 - 1
    assert torch.equal(item["lowres"], expected) and item["lowres"].shape == (3, 16, 16)


def test_box_and_brush_masks_leave_the_scene_alone(train: SceneDataset, cache: Path) -> None:
    for mode in ("box", "brush"):
        ds = SceneDataset("train", 64, objects=(2, 4), mask=mode, cache_dir=cache, length=100)
        item = ds[2]
        assert torch.equal(item["image"], train[2]["image"])
        m = item["mask"]
        assert m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
        assert item["mask_object"] == -1
        assert torch.equal(ds[2]["mask"], m)


def test_bsr_lowres(cache: Path) -> None:
    ds = SceneDataset("val", 32, lowres="bsr", cache_dir=cache, length=4)
    a, b = ds[1]["lowres"], ds[1]["lowres"]
    assert a.shape == (3, 8, 8) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1


def test_layout_tokens_from_boxes(train: SceneDataset) -> None:
    item = train[0]
    objects = layout_objects(item["boxes"], item["box_classes"])
    assert len(objects) == item["num_objects"]
    tok = LayoutTokenizer(n_object_classes=len(SCENE_CLASSES), max_objects=4)
    decoded, _ = tok.decode(tok.encode(objects))
    assert [o.class_id for o in decoded] == item["box_classes"][: len(objects)].tolist()


def test_asset_index_is_cached_atomically(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_asset_index(cache=cache)
    files = list((cache / "scenes").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary files left behind

    def no_scan(*args: object) -> None:
        raise AssertionError("the cached index must not be rebuilt")

    monkeypatch.setattr(assets_mod, "_scan", no_scan)
    assert len(load_asset_index(cache=cache)) > 9000


def test_missing_packages_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"fonts-noto-color-emoji.*openclipart-png"):
        load_asset_index(emoji_font=tmp_path / "none.ttf", clipart_root=tmp_path / "none", cache=tmp_path)
    with pytest.raises(ValueError, match="valid sources are"):
        load_asset_index(["photos"], cache=tmp_path)


def test_bad_options_are_explained(cache: Path) -> None:
    with pytest.raises(ValueError, match="valid splits"):
        SceneDataset("test", cache_dir=cache)
    with pytest.raises(ValueError, match="valid modes"):
        SceneDataset("train", 64, mask="lasso", cache_dir=cache)
    with pytest.raises(ValueError, match="multiple of lowres_factor"):
        SceneDataset("train", 66, cache_dir=cache)
    with pytest.raises(IndexError):
        SceneDataset("train", 64, cache_dir=cache, length=3)[3]


def test_import_scans_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "LDM_SDK_CACHE": str(tmp_path / "c")}
    code = "import ldm_sdk.training.data.scenes, ldm_sdk.training.data, ldm_sdk.evaluation"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not (tmp_path / "c").exists()
