"""Mask operations of inpainting and outpainting: binarise, grow, feather, latent mask, pixel composite.

User-facing convention: **1 / white = the region to repaint** (what the LDM and SD inpainting models take).
:class:`~ldm_sdk.diffusion.masking.MaskedDenoiser` uses the opposite (1 = keep); :func:`latent_keep_mask`
converts.

- :func:`grow`: dilate the repaint region by ``n`` pixels (an octagon, alternating 3x3 square and cross
  steps: within 8% of a disk).
- :func:`composite_alpha`: the weight of the generated pixels in the final composite. Without feather it is
  the region itself. With feather ``sigma`` it is the Gaussian blur (``sigma`` px) of the region, remapped
  from [0.5, 1] to [0, 1] and set to exactly 0 outside the region: the soft edge lies inside the region
  (rising from 0 at its border to 0.68 at ``sigma`` and 0.95 at ``2 sigma`` inside; grow the mask to move it
  outward), and every pixel outside the region keeps alpha 0.
- :func:`composite`: ``alpha * generated + (1 - alpha) * original`` in pixel space, rounded to uint8, with
  the original's exact bytes wherever alpha is 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ldm_sdk.tasks.base import TaskError

__all__ = [
    "binarize",
    "check_mask",
    "composite",
    "composite_alpha",
    "erode",
    "gaussian_blur",
    "grow",
    "latent_keep_mask",
]


def binarize(mask: np.ndarray) -> np.ndarray:
    """``mask >= 0.5`` (as both original inpainting models binarise)."""
    return np.asarray(mask) >= 0.5


def check_mask(region: np.ndarray, image_hw: tuple[int, int], *, allow_full: bool = False) -> None:
    """Refuse a mask of another size, one that selects nothing, or (unless ``allow_full``) everything."""
    if region.shape[:2] != tuple(image_hw):
        mh, mw = region.shape[:2]
        raise TaskError(
            f"the mask is {mw}x{mh} (WxH) but the image is {image_hw[1]}x{image_hw[0]}: they must be the "
            "same size (white = repaint, black = keep)"
        )
    if not region.any():
        raise TaskError(
            "the mask is empty (no pixel >= 50% white): nothing to repaint; white marks the region to repaint"
        )
    if region.all() and not allow_full:
        raise TaskError(
            "the mask covers the whole image: nothing is left to keep; use txt2img (or img2img) instead, or "
            "leave part of the mask black"
        )


def _as_tensor(region: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]


def grow(region: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate a boolean ``H x W`` region by ``pixels`` (octagonal structuring element)."""
    if pixels <= 0:
        return region.copy()
    x = _as_tensor(region)
    for i in range(pixels):
        if i % 2 == 0:  # square step
            x = F.max_pool2d(x, 3, stride=1, padding=1)
        else:  # cross step
            p = F.pad(x, (1, 1, 1, 1))
            x = torch.maximum(
                torch.maximum(torch.maximum(p[..., 1:-1, :-2], p[..., 1:-1, 2:]), p[..., :-2, 1:-1]),
                torch.maximum(p[..., 2:, 1:-1], x),
            )
    return x[0, 0].numpy() > 0.5


def erode(region: np.ndarray, pixels: int) -> np.ndarray:
    """Erode a boolean region by ``pixels`` (the image border does not erode it)."""
    return ~grow(~region, pixels)


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float ``H x W`` array (``sigma`` px, radius ``ceil(3 sigma)``,
    replicated borders)."""
    if sigma <= 0:
        return values.astype(np.float32)
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    x = _as_tensor(values)
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[0, 0].numpy()


def composite_alpha(region: np.ndarray, feather: float) -> np.ndarray:
    """The generated pixels' weight, float32 ``H x W`` in [0, 1]; exactly 0 outside ``region``."""
    if feather <= 0:
        return region.astype(np.float32)
    alpha = np.clip(2.0 * gaussian_blur(region.astype(np.float32), feather) - 1.0, 0.0, 1.0)
    alpha[~region] = 0.0
    alpha[alpha > 0.999] = 1.0  # deep inside: exactly the generated pixels
    return alpha.astype(np.float32)


def latent_keep_mask(region: np.ndarray, factor: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, H / f, W / f]`` with 1 where a latent cell holds no repainted pixel (MaskedDenoiser's keep
    convention) and 0 where any pixel of its ``f x f`` cell is to be repainted."""
    repaint = F.max_pool2d(_as_tensor(region), factor, stride=factor)
    return (1.0 - repaint).to(device)


def composite(original: np.ndarray, generated: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``alpha * generated + (1 - alpha) * original`` as uint8; the original's bytes where ``alpha == 0``
    and the generated ones where ``alpha == 1``."""
    if original.shape != generated.shape or original.shape[:2] != alpha.shape:
        raise ValueError(f"shapes differ: {original.shape}, {generated.shape}, alpha {alpha.shape}")
    a = alpha.astype(np.float32, copy=False)
    out = np.where((a == 1.0)[..., None], generated, original)
    # the arithmetic only where the weights mix (the feathered band; none without feather): a 512 x 512
    # composite over the whole image took several milliseconds, most of an inpaint's CPU work
    band = (a != 0.0) & (a != 1.0)
    if band.any():
        w = a[band][:, None]
        new, old = generated[band].astype(np.float32), original[band].astype(np.float32)
        mixed = np.round(w * new + (1.0 - w) * old)
        out[band] = np.clip(mixed, 0, 255).astype(np.uint8)
    return out
