"""Task image I/O: clear errors for bad files, exact conversions, explicit fitting, all-or-nothing writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sdk.tasks.base import TaskError
from ldm_sdk.tasks.context import check_size
from ldm_sdk.tasks.images import (
    Fit,
    array_sha256,
    as_mask,
    as_rgb,
    fit_array,
    output_paths,
    read_image,
    read_mask,
    tensor_to_images,
    to_tensor,
    unfit_array,
)


def test_read_image_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="image file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(TaskError, match="is a folder"):
        read_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(TaskError, match="is not an image file"):
        read_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(TaskError, match="could not be read"):
        read_image(truncated)
    with pytest.raises(TaskError, match="mask file not found"):
        read_mask(tmp_path / "nomask.png")


def test_read_image_modes(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png", "RGBA"), rgba)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").shape == (5, 7, 3)
    assert np.array_equal(read_mask(tmp_path / "g.png"), grey.astype(np.float32) / 255)


def test_alpha_mask(tmp_path: Path) -> None:
    """A white layer whose alpha marks the region (a host selection exported with transparency)."""
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[1:3, 1:3, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "sel.png")
    assert np.array_equal(read_mask(tmp_path / "sel.png") > 0.5, rgba[..., 3] > 0)


def test_as_rgb_and_mask_conversions() -> None:
    u8 = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    assert np.array_equal(as_rgb(u8), u8)
    assert np.array_equal(as_rgb(Image.fromarray(u8)), u8)
    assert np.array_equal(as_rgb(u8.astype(np.float32) / 255), u8)
    assert np.array_equal(as_rgb(to_tensor(u8)[0]), u8)  # a [-1, 1] tensor round-trips exactly
    with pytest.raises(TaskError, match=r"must lie in \[0, 1\]"):
        as_rgb(u8.astype(np.float32))
    with pytest.raises(TaskError, match="H x W x 3"):
        as_rgb(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(TaskError, match="must be a path, PIL image"):
        as_rgb(42)
    m = np.zeros((6, 4), bool)
    m[2, 2] = True
    assert np.array_equal(as_mask(m), m.astype(np.float32))
    assert np.array_equal(as_mask(m.astype(np.uint8) * 255), m.astype(np.float32))
    with pytest.raises(TaskError, match="1 = repaint"):
        as_mask(np.full((2, 2), 2.0))


def test_tensor_round_trip_is_exact() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, 2)
    t = to_tensor([u8, u8[::-1]])
    assert t.shape == (2, 3, 16, 16) and t.min() == -1 and t.max() == 1
    back = tensor_to_images(t)
    assert np.array_equal(back[0], u8) and np.array_equal(back[1], u8[::-1])
    assert tensor_to_images(torch.full((1, 3, 2, 2), 3.0))[0].min() == 255  # clamped


def test_fit_pad_and_crop() -> None:
    a = np.arange(10 * 13 * 3, dtype=np.uint8).reshape(10, 13, 3)
    padded = fit_array(a, 8, "pad")
    assert padded.shape == (16, 16, 3)
    assert np.array_equal(padded[:10, :13], a) and np.array_equal(padded[15, 15], a[9, 12])
    assert np.array_equal(unfit_array(padded, Fit("pad", (10, 13), (16, 16))), a)
    cropped = fit_array(a, 8, "crop")
    assert np.array_equal(cropped, a[:8, :8])
    assert fit_array(a, 8, "error") is a
    region = fit_array(np.ones((10, 13), bool), 8, "pad", pad_value=False)
    assert region.sum() == 130 and region.shape == (16, 16)
    with pytest.raises(TaskError, match="too small; use pad"):
        fit_array(a[:5], 8, "crop")


def test_check_size_names_valid_sizes_and_options() -> None:
    check_size(64, 128, 64)
    with pytest.raises(TaskError) as info:
        check_size(100, 64, 64)
    text = str(info.value)
    assert "64x100 (WxH) is not a multiple of 64" in text and "height 100: use 64 or 128" in text
    assert "--pad" in text and "--crop" in text and "never resized" in text
    with pytest.raises(TaskError) as info:
        check_size(64, 30, 16, can_fit=False)
    assert "--pad" not in str(info.value) and "width 30: use 16 or 32" in str(info.value)


def test_array_hash_depends_on_shape_and_dtype() -> None:
    a = np.zeros((2, 3), np.uint8)
    assert array_sha256(a) == array_sha256(a.copy())
    assert array_sha256(a) != array_sha256(a.reshape(3, 2))
    assert array_sha256(a) != array_sha256(a.astype(np.float32))


def test_output_paths(tmp_path: Path) -> None:
    assert output_paths(tmp_path / "x.png", 1, stem="t") == [tmp_path / "x.png"]
    assert output_paths(tmp_path / "x.png", 2, stem="t") == [tmp_path / "x-0.png", tmp_path / "x-1.png"]
    assert output_paths(tmp_path, 2, stem="t") == [tmp_path / "t-0.png", tmp_path / "t-1.png"]
    with pytest.raises(TaskError, match=r"must be a \.png file"):
        output_paths(tmp_path / "x.jpg", 1, stem="t")
    with pytest.raises(TaskError, match="does not exist"):
        output_paths(tmp_path / "nope" / "x.png", 1, stem="t")
