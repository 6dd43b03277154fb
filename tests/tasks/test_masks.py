"""Mask operations: grow, feather, latent mask, exact pixel composite."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_sdk.tasks.base import TaskError
from ldm_sdk.tasks.masks import (
    binarize,
    check_mask,
    composite,
    composite_alpha,
    erode,
    grow,
    latent_keep_mask,
)


def _square(size: int = 32, lo: int = 12, hi: int = 20) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_binarize_at_half() -> None:
    assert binarize(np.array([[0.0, 0.49, 0.5, 1.0]])).tolist() == [[False, False, True, True]]


def test_grow_and_erode() -> None:
    m = np.zeros((21, 21), bool)
    m[10, 10] = True
    assert np.array_equal(grow(m, 0), m)
    g1 = grow(m, 1)  # one square step: 3x3
    assert g1.sum() == 9
    g2 = grow(m, 2)  # square then cross: an octagon of radius 2
    assert g2.sum() == 21 and not g2[8, 8] and g2[8, 9] and g2[10, 8]
    g6 = grow(m, 6)
    ys, xs = np.nonzero(g6)
    assert ys.min() == 4 and ys.max() == 16 and xs.min() == 4 and xs.max() == 16
    assert np.array_equal(erode(grow(_square(), 3), 3), _square())
    border = np.ones((8, 8), bool)
    assert erode(border, 2).all()  # the image border does not erode


def test_check_mask_errors() -> None:
    with pytest.raises(TaskError, match=r"mask is 16x8 \(WxH\) but the image is 32x32"):
        check_mask(np.ones((8, 16), bool), (32, 32))
    with pytest.raises(TaskError, match="mask is empty"):
        check_mask(np.zeros((4, 4), bool), (4, 4))
    with pytest.raises(TaskError, match="covers the whole image"):
        check_mask(np.ones((4, 4), bool), (4, 4))
    check_mask(np.ones((4, 4), bool), (4, 4), allow_full=True)


def test_alpha_is_zero_outside_and_one_deep_inside() -> None:
    region = _square(64, 8, 56)
    hard = composite_alpha(region, 0)
    assert np.array_equal(hard, region.astype(np.float32))
    soft = composite_alpha(region, 2.0)
    assert (soft[~region] == 0).all()
    assert (soft[20:44, 20:44] == 1).all()
    inner_edge = soft[12:52, 8]
    assert inner_edge.max() < 0.3  # the soft edge lies inside the region, rising from its border
    row = soft[32, 8:32]
    assert np.all(np.diff(row) >= -1e-6) and row[-1] == 1.0 and row[0] < 0.3
    # a thin stroke fades but does not vanish
    stroke = np.zeros((32, 32), bool)
    stroke[10:22, 14:18] = True
    assert 0.5 < composite_alpha(stroke, 1.5).max() < 1


def test_latent_keep_mask() -> None:
    region = np.zeros((16, 16), bool)
    region[5, 9] = True  # one pixel in latent cell (1, 2) of a factor-4 grid
    keep = latent_keep_mask(region, 4, device=__import__("torch").device("cpu"))
    assert keep.shape == (1, 1, 4, 4)
    assert keep[0, 0, 1, 2] == 0 and keep.sum() == 15


def test_composite_exact_outside() -> None:
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    region = _square()
    alpha = composite_alpha(region, 1.5)
    out = composite(original, generated, alpha)
    assert np.array_equal(out[~region], original[~region])
    assert np.array_equal(out[alpha == 1], generated[alpha == 1])
    mid = (alpha > 0) & (alpha < 1)
    assert mid.any()
    want = np.round(alpha[mid][:, None] * generated[mid] + (1 - alpha[mid][:, None]) * original[mid])
    assert np.array_equal(out[mid], want.astype(np.uint8))


@pytest.mark.parametrize("feather", [0.0, 1.5, 6.0])
def test_composite_equals_the_whole_image_formula(feather: float) -> None:
    """The composite blends only where ``0 < alpha < 1``; it must equal the formula applied to every pixel
    (float32 arithmetic, rounded, then the exact bytes where alpha is 0 or 1), including views of larger
    images as inpaint passes them."""
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)[:40, :48]
    region = np.zeros((40, 48), bool)
    region[8:30, 10:40] = True
    alpha = composite_alpha(region, feather)
    a = alpha[..., None].astype(np.float32)
    whole = np.round(a * generated.astype(np.float32) + (1.0 - a) * original.astype(np.float32))
    want = np.where(a == 0.0, original, np.clip(whole, 0, 255).astype(np.uint8))
    want = np.where(a == 1.0, generated, want)
    out = composite(original, generated, alpha)
    assert out.dtype == np.uint8 and out.shape == original.shape
    assert np.array_equal(out, want)
    assert ((alpha > 0) & (alpha < 1)).any() == (feather > 0)
