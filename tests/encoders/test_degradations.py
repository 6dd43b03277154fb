"""Degradations: bicubic x4 against PIL, Gaussian kernels in closed form, the random chain's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sdk.encoders.degradations import (
    BSRDegradation,
    anisotropic_gaussian_kernel,
    bicubic_downsample,
    degrade_bsr,
    isotropic_gaussian_kernel,
)


def _pil_bicubic(channel: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    # PIL on a 32-bit float image ("F"): antialiased Keys bicubic (a = -0.5), no uint8 rounding
    return np.asarray(Image.fromarray(channel.astype(np.float32), mode="F").resize(size_wh, Image.BICUBIC))


def test_bicubic_x4_matches_pil() -> None:
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    out = bicubic_downsample(x, 4)
    assert out.shape == (2, 3, 10, 14)
    ref = np.stack([[_pil_bicubic(x[b, c].numpy(), (14, 10)) for c in range(3)] for b in range(2)])
    # same kernel and border rule; the difference is float32 summation order
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0)


def test_bicubic_needs_multiple_of_factor() -> None:
    with pytest.raises(ValueError, match="not a multiple of the scale 4; crop it to 40x52"):
        bicubic_downsample(torch.rand(1, 3, 42, 53), 4)


def test_gaussian_kernels_closed_form() -> None:
    k = isotropic_gaussian_kernel(5, 1.3, dtype=torch.float64)
    r = np.arange(5) - 2
    ref = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.3**2))
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), rtol=1e-12)
    # anisotropic with theta = pi/2 swaps the axes: variance 4 along y, 1 along x
    a = anisotropic_gaussian_kernel(7, math.pi / 2, 4.0, 1.0, dtype=torch.float64).numpy()
    r = np.arange(7) - 3
    ref = np.exp(-0.5 * (r[None, :] ** 2 / 1.0 + r[:, None] ** 2 / 4.0))  # [y, x]
    np.testing.assert_allclose(a, ref / ref.sum(), rtol=1e-9, atol=1e-12)
    # equal eigenvalues: isotropic for any angle
    iso = anisotropic_gaussian_kernel(5, 0.7, 2.0, 2.0, dtype=torch.float64)
    torch.testing.assert_close(iso, isotropic_gaussian_kernel(5, math.sqrt(2.0), dtype=torch.float64))


def _image() -> torch.Tensor:
    return torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))


def test_chain_shape_range_and_seed_determinism() -> None:
    x = _image()
    a = degrade_bsr(x, torch.Generator().manual_seed(7))
    b = degrade_bsr(x, torch.Generator().manual_seed(7))
    c = degrade_bsr(x, torch.Generator().manual_seed(8))
    assert a.shape == (2, 3, 12, 16) and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_chain_stays_close_to_bicubic() -> None:
    # a degraded image is still an image of the same content: closer to its own bicubic x4
    # than to the bicubic x4 of an unrelated image
    x = _image()
    y = degrade_bsr(x, torch.Generator().manual_seed(3))
    own = (y - bicubic_downsample(x, 4)).abs().mean()
    other = (y - bicubic_downsample(x.flip(0), 4)).abs().mean()
    assert own < other


def test_chain_seeds_vary_and_errors() -> None:
    x = _image()[:1]
    outs = {degrade_bsr(x, torch.Generator().manual_seed(s)).sum().item() for s in range(4)}
    assert len(outs) == 4
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        BSRDegradation()(torch.rand(1, 1, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match=r"jpeg_quality must lie in 1\.\.100"):
        BSRDegradation(jpeg_quality=(0, 50))
