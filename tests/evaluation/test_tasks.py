"""Task metrics: inpainting must not touch pixels outside the mask; SR is measured against bicubic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_sdk.encoders.degradations import bicubic_downsample
from ldm_sdk.evaluation.tasks import outside_mask_error, sr_gain


def test_outside_mask_error() -> None:
    g = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 3:12] = 1.0  # 1 = the region that was filled
    result = torch.where(mask.bool(), torch.rand(2, 3, 16, 16, generator=g), original)
    assert outside_mask_error(result, original, mask) == {
        "max_abs": 0.0,
        "mean_abs": 0.0,
        "outside_fraction": pytest.approx(1 - 54 / 256),
    }
    result[1, 2, 0, 0] += 0.5  # one pixel outside changed
    err = outside_mask_error(result, original, mask[0, 0])  # an [H, W] mask broadcasts over the batch
    outside = 2 * 3 * (256 - 54)
    assert err["max_abs"] == pytest.approx(0.5) and err["mean_abs"] == pytest.approx(0.5 / outside)
    with pytest.raises(ValueError, match="does not fit"):
        outside_mask_error(result, original, torch.zeros(8, 8))


def test_sr_gain_against_bicubic() -> None:
    g = torch.Generator().manual_seed(1)
    hr = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=32, mode="bilinear") * 2 - 1
    out = sr_gain(hr + 0.01, hr)
    # the baseline, computed here independently
    low = bicubic_downsample((hr + 1) / 2, 4)
    base = F.interpolate(low, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mse = ((base - (hr + 1) / 2) ** 2).mean()
    assert out["psnr_bicubic"] == pytest.approx(float(10 * torch.log10(1 / mse)), abs=1e-3)
    assert out["psnr_sr"] == pytest.approx(-20 * torch.log10(torch.tensor(0.005)).item(), abs=1e-2)
    assert out["gain_db"] == pytest.approx(out["psnr_sr"] - out["psnr_bicubic"])
    assert out["gain_db"] > 0
    # a bicubic "SR" has no gain over bicubic
    assert sr_gain(base * 2 - 1, hr, low * 2 - 1)["gain_db"] == pytest.approx(0.0, abs=1e-4)
