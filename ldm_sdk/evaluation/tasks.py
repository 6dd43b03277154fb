"""Task metrics: does inpainting keep the unmasked pixels, does super-resolution beat bicubic.

- :func:`outside_mask_error`: the absolute difference between the result and the original where the mask
  is off (``mask < 0.5``; 1 = the region that was filled). An inpainting task that pastes the original
  back outside the mask (as the SDK's tasks do) must give exactly 0; a model that only blends latents shows
  the first stage's reconstruction error there.
- :func:`sr_gain`: PSNR of the super-resolved image against the high-res original, and of the bicubic
  upsampling of the low-res input (the baseline every SR model must beat); ``gain_db`` is their difference.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.evaluation.reconstruction import psnr


def _mask4(mask: Tensor, like: Tensor) -> Tensor:
    """A mask as ``[B, 1, H, W]`` (from ``[H, W]``, ``[1, H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``)."""
    m = mask
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None] if m.shape[0] == like.shape[0] and like.shape[0] != 1 else m[None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[-2:] != like.shape[-2:]:
        raise ValueError(
            f"mask {list(mask.shape)} does not fit images {list(like.shape)}: "
            "expected [H, W], [1, H, W], [B, H, W] or [B, 1, H, W] of the images' size"
        )
    return m.expand(like.shape[0], 1, *like.shape[-2:])


def outside_mask_error(result: Tensor, original: Tensor, mask: Tensor) -> dict[str, float]:
    """``max_abs`` and ``mean_abs`` of ``result - original`` over the pixels (all channels) where
    ``mask < 0.5``, in the images' own units; ``outside_fraction``: the share of such pixels."""
    if result.shape != original.shape or result.ndim != 4:
        raise ValueError(
            f"expected two [B, C, H, W] images of one shape; got {list(result.shape)}, {list(original.shape)}"
        )
    keep = (_mask4(mask, result) < 0.5).expand_as(result)
    if not bool(keep.any()):
        return {"max_abs": 0.0, "mean_abs": 0.0, "outside_fraction": 0.0}
    diff = (result.float() - original.float()).abs()[keep]
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "outside_fraction": float(keep.float().mean()),
    }


def bicubic_upsample(
    lowres: Tensor, size: tuple[int, int], value_range: tuple[float, float] = (-1.0, 1.0)
) -> Tensor:
    """Bicubic upsampling (``align_corners=False``) to ``size``, clamped to ``value_range``."""
    up = F.interpolate(lowres.float(), size=size, mode="bicubic", align_corners=False)
    return up.clamp(*value_range)


def sr_gain(
    sr: Tensor,
    hr: Tensor,
    lowres: Tensor | None = None,
    *,
    factor: int = 4,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> dict[str, float]:
    """Mean PSNR of ``sr`` and of the bicubic baseline against ``hr``; ``lowres`` defaults to
    :func:`~ldm_sdk.encoders.degradations.bicubic_downsample` of ``hr`` by ``factor``."""
    from ldm_sdk.encoders.degradations import bicubic_downsample

    if sr.shape != hr.shape:
        raise ValueError(f"sr {list(sr.shape)} and hr {list(hr.shape)} must have one shape")
    if lowres is None:
        lo, hi = value_range
        unit = (hr.float() - lo) / (hi - lo)
        lowres = bicubic_downsample(unit, factor) * (hi - lo) + lo
    baseline = bicubic_upsample(lowres, tuple(hr.shape[-2:]), value_range)  # type: ignore[arg-type]
    p_sr = psnr(sr, hr, value_range=value_range).mean()
    p_bic = psnr(baseline, hr, value_range=value_range).mean()
    return {"psnr_sr": float(p_sr), "psnr_bicubic": float(p_bic), "gain_db": float(p_sr - p_bic)}


__all__ = ["bicubic_upsample", "outside_mask_error", "sr_gain"]
