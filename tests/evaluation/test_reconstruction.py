"""PSNR / SSIM against closed forms and an independent numpy SSIM; LPIPS weight handling.

LPIPS here runs on a RANDOMLY INITIALISED stand-in trunk (no VGG/AlexNet weights exist offline): the tests
check plumbing and metric axioms, and the values are not perceptual nor comparable with published LPIPS.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_sdk.evaluation.generative import MissingWeightsError
from ldm_sdk.evaluation.reconstruction import LPIPSMetric, psnr, ssim, write_standin_trunk


def _images(seed: int, shape: tuple[int, ...] = (2, 3, 24, 24)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_closed_form() -> None:
    x = _images(0) * 0.5  # in [-0.5, 0.5]: the offsets below never clip
    for delta in (0.1, 0.02):
        y = x + delta  # in [0, 1] units the error is delta / 2 everywhere
        expected = -20 * math.log10(delta / 2)
        assert psnr(x, y).tolist() == pytest.approx([expected] * 2, abs=1e-3)
    assert psnr(x, x).isinf().all()
    # in [0, 1] units with value_range=(0, 1): MSE from numpy
    a, b = (x + 1) / 2, (_images(1) + 1) / 2
    mse = ((a.numpy().astype(np.float64) - b.numpy()) ** 2).reshape(2, -1).mean(axis=1)
    assert psnr(a, b, value_range=(0, 1)).tolist() == pytest.approx(
        (10 * np.log10(1 / mse)).tolist(), abs=1e-3
    )


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 SSIM, 11x11 Gaussian (sigma 1.5), valid windows, data range 1; float64."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    g /= g.sum()
    w = np.outer(g, g)

    def filt(img: np.ndarray) -> np.ndarray:
        h, wd = img.shape
        out = np.empty((h - 10, wd - 10))
        for i in range(h - 10):
            for j in range(wd - 10):
                out[i, j] = (img[i : i + 11, j : j + 11] * w).sum()
        return out

    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ca, cb in zip(a, b, strict=True):
        mu_a, mu_b = filt(ca), filt(cb)
        var_a = filt(ca * ca) - mu_a**2
        var_b = filt(cb * cb) - mu_b**2
        cov = filt(ca * cb) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def test_ssim_against_numpy_and_closed_form() -> None:
    x = _images(2, (1, 3, 20, 20))
    y = (x + 0.3 * _images(3, (1, 3, 20, 20))).clamp(-1, 1)
    ref = _ssim_numpy(((x[0] + 1) / 2).double().numpy(), ((y[0] + 1) / 2).double().numpy())
    assert float(ssim(x, y)[0]) == pytest.approx(ref, abs=1e-4)
    assert 0.0 < ref < 0.99
    assert ssim(x, x).tolist() == pytest.approx([1.0], abs=1e-5)
    # two constant images: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    m1, m2, c1 = 0.25, 0.75, 0.01**2
    a, b = torch.full((1, 3, 16, 16), m1 * 2 - 1), torch.full((1, 3, 16, 16), m2 * 2 - 1)
    assert float(ssim(a, b)[0]) == pytest.approx((2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), abs=1e-5)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_lpips_needs_trunk_weights(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="No pretrained weights exist offline"):
        LPIPSMetric(None)
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth"):
        LPIPSMetric(tmp_path / "missing.pth", net="alex")
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match="is not a alex trunk"):
        LPIPSMetric(wrong, net="alex")


def test_lpips_with_standin_trunk(tmp_path: Path) -> None:
    """Stand-in (random) trunk: the values are NOT comparable with published LPIPS."""
    trunk = write_standin_trunk(tmp_path / "alex.pth", net="alex")
    metric = LPIPSMetric(trunk, net="alex")
    x, y = _images(4, (2, 3, 32, 32)), _images(5, (2, 3, 32, 32))
    assert metric(x, x).abs().max() < 1e-6
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(metric(y, x), d, atol=1e-6)
    closer = metric(x, (x + 0.05 * y).clamp(-1, 1))
    assert (closer < d).all()
    # an LPIPS-format state dict (net.sliceK.N.*) loads too and gives the same distances
    lp_format = tmp_path / "lpips_state.pth"
    torch.save({k: v for k, v in metric.model.state_dict().items() if k.startswith("net.")}, lp_format)
    assert torch.allclose(LPIPSMetric(lp_format, net="alex")(x, y), d, atol=1e-6)
