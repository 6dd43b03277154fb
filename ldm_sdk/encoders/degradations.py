"""Training degradations for super-resolution: bicubic downsampling and a BSR-style random chain.

LDM's ``bsr_sr`` model was trained on (high-res, degraded low-res) pairs made by ``bsrgan_light``
(``degradation_bsrgan_variant`` of Zhang et al., "Designing a Practical Degradation Model for Deep Blind
Image Super-Resolution", ICCV 2021). :class:`BSRDegradation` is a torch/kornia chain *in the spirit of
BSRGAN's ``degradation_bsrgan_variant``, not bit-identical* to it (OpenCV resizes and libjpeg are replaced
by ``torch.nn.functional.interpolate`` and kornia's differentiable JPEG):

1. with probability ``scale2_prob`` (scale 4 only) a first 2x downsampling (random interpolation);
2. in random order: a blur with a random isotropic or anisotropic Gaussian kernel; a random resize up or
   down with random interpolation; Gaussian noise (colour, grey or channel-correlated); JPEG compression
   (probability ``jpeg_prob``); the resize to the final size ``(H / scale, W / scale)`` (random
   interpolation) always comes after the random resize, as in the original;
3. a final JPEG compression.

Every random choice is drawn from the ``torch.Generator`` passed in, one batch item after the other, so
a fixed generator state gives the same output. Images are float ``[B, 3, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

#: interpolation modes drawn for random resizes (OpenCV's INTER_LINEAR / INTER_CUBIC / INTER_AREA)
RESIZE_MODES = ("bilinear", "bicubic", "area")


def _check_image(image: Tensor, scale: int) -> None:
    if not image.is_floating_point() or image.ndim != 4:
        raise ValueError(f"expected a float image [B, C, H, W]; got {image.dtype} {list(image.shape)}")
    h, w = image.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of the scale {scale}; crop it to "
            f"{h - h % scale}x{w - w % scale} first (BSRGAN mod-crops the same way)"
        )


def bicubic_downsample(image: Tensor, factor: int = 4) -> Tensor:
    """Antialiased bicubic downsampling by ``factor`` (Keys a=-0.5 with a widened kernel, as PIL's
    ``Image.resize(BICUBIC)`` and MATLAB's ``imresize``): ``[B, C, H, W]`` -> ``[B, C, H/f, W/f]``."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1; got {factor}")
    _check_image(image, factor)
    size = (image.shape[-2] // factor, image.shape[-1] // factor)
    return F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)


def isotropic_gaussian_kernel(size: int, sigma: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """A normalised ``[size, size]`` Gaussian with standard deviation ``sigma`` (pixels), centred."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * max(sigma, 1e-3) ** 2))
    return (g / g.sum()).to(dtype)


def anisotropic_gaussian_kernel(
    size: int, theta: float, var1: float, var2: float, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A normalised ``[size, size]`` Gaussian with covariance ``R(theta) diag(var1, var2) R(theta)^T``."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([max(var1, 1e-4), max(var2, 1e-4)], dtype=torch.float64)) @ rot.T
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    pts = torch.stack([xx, yy], dim=-1)  # (x, y) per pixel
    g = torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", pts, torch.linalg.inv(cov), pts))
    return (g / g.sum()).to(dtype)


class _Draw:
    """Scalar random draws from one generator."""

    def __init__(self, generator: torch.Generator) -> None:
        self.g = generator

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g, device=self.g.device))

    def randint(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]`` (both inclusive)."""
        return int(torch.randint(lo, hi + 1, (), generator=self.g, device=self.g.device))

    def choice(self, options: Sequence[str]) -> str:
        return options[self.randint(0, len(options) - 1)]

    def randn(self, shape: Sequence[int], like: Tensor) -> Tensor:
        z = torch.randn(tuple(shape), generator=self.g, device=self.g.device, dtype=torch.float32)
        return z.to(device=like.device, dtype=like.dtype)

    def permutation(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.g, device=self.g.device).tolist()


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=size, mode=mode, **kw).clamp(0.0, 1.0)


@dataclass(frozen=True)
class BSRDegradation:
    """The random degradation chain (see the module docstring). ``noise_level`` and ``jpeg_quality`` are
    inclusive integer ranges; noise levels are in 1/255 units (``bsrgan_light`` uses 1..2)."""

    scale: int = 4
    scale2_prob: float = 0.25
    jpeg_prob: float = 0.9
    noise_level: tuple[int, int] = (1, 2)
    jpeg_quality: tuple[int, int] = (80, 95)

    def __post_init__(self) -> None:
        if self.scale < 1:
            raise ValueError(f"scale must be >= 1; got {self.scale}")
        for name in ("noise_level", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be a (low, high) range; got {(lo, hi)}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100; got {self.jpeg_quality}")

    def __call__(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, H / scale, W / scale]`` in ``[0, 1]``."""
        _check_image(image, self.scale)
        if image.shape[1] != 3:
            raise ValueError(f"the degradation chain takes RGB images [B, 3, H, W]; got {list(image.shape)}")
        draw = _Draw(generator)
        return torch.cat([self._one(image[i : i + 1], draw) for i in range(image.shape[0])], dim=0)

    def _one(self, x: Tensor, draw: _Draw) -> Tensor:
        h, w = x.shape[-2:]
        target = (h // self.scale, w // self.scale)
        sf = self.scale
        if sf == 4 and draw.uniform() < self.scale2_prob:  # downsample1
            if draw.uniform() < 0.5:
                x = _resize(x, (h // 2, w // 2), draw.choice(RESIZE_MODES))
            else:
                x = bicubic_downsample(x, 2).clamp(0.0, 1.0)
            sf = 2
        order = draw.permutation(5)  # 0 blur, 1 random resize, 2 final resize, 3 noise, 4 jpeg
        i1, i2 = order.index(1), order.index(2)
        if i1 > i2:  # keep the final resize after the random one
            order[i1], order[i2] = order[i2], order[i1]
        for op in order:
            if op == 0:
                x = self.blur(x, draw, sf)
            elif op == 1:
                x = self.random_resize(x, draw, sf)
            elif op == 2:
                x = _resize(x, target, draw.choice(RESIZE_MODES))
            elif op == 3:
                x = self.gaussian_noise(x, draw)
            elif draw.uniform() < self.jpeg_prob:
                x = self.jpeg(x, draw)
        return self.jpeg(x, draw)

    @staticmethod
    def blur(x: Tensor, draw: _Draw, sf: int) -> Tensor:
        """BSRGAN ``add_blur``: anisotropic (p=0.5, eigen-variances up to ``(4 + sf) / 4``) or isotropic
        (sigma up to ``(2 + 0.2 sf) / 4``) Gaussian, reflect-padded."""
        wd2, wd = (4.0 + sf) / 4, (2.0 + 0.2 * sf) / 4
        if draw.uniform() < 0.5:
            size = 2 * draw.randint(1, 6) + 1  # odd sizes 3..13 (BSRGAN: 5..14)
            k = anisotropic_gaussian_kernel(
                size, draw.uniform(0, math.pi), wd2 * draw.uniform(), wd2 * draw.uniform(), dtype=x.dtype
            )
        else:
            size = 2 * draw.randint(2, 3) + 1  # 5 or 7
            k = isotropic_gaussian_kernel(size, wd * draw.uniform(), dtype=x.dtype)
        limit = 2 * min(x.shape[-2:]) - 1  # reflect padding needs pad < size
        if k.shape[-1] > limit:
            c, half = k.shape[-1] // 2, limit // 2
            k = k[c - half : c + half + 1, c - half : c + half + 1]
            k = k / k.sum()
        return kornia.filters.filter2d(x, k[None].to(x.device), border_type="reflect")

    @staticmethod
    def random_resize(x: Tensor, draw: _Draw, sf: int) -> Tensor:
        """BSRGAN ``add_resize``: up by U(1, 2) (p=0.2), down by U(0.5 / sf, 1) (p=0.7), else unchanged."""
        r = draw.uniform()
        factor = draw.uniform(1.0, 2.0) if r > 0.8 else draw.uniform(0.5 / sf, 1.0) if r < 0.7 else 1.0
        mode = draw.choice(RESIZE_MODES)
        h, w = x.shape[-2:]
        return _resize(x, (int(factor * h), int(factor * w)), mode)

    def gaussian_noise(self, x: Tensor, draw: _Draw) -> Tensor:
        """BSRGAN ``add_Gaussian_noise``: colour (p=0.4), grey (p=0.4) or channel-correlated noise."""
        level = draw.randint(*self.noise_level) / 255.0
        r = draw.uniform()
        b, c, h, w = x.shape
        if r > 0.6:
            noise = level * draw.randn((b, c, h, w), x)
        elif r < 0.4:
            noise = level * draw.randn((b, 1, h, w), x)
        else:  # covariance L^2 U^T D U with a random rotation U and random D
            top = self.noise_level[1] / 255.0
            d = torch.tensor([draw.uniform() for _ in range(c)], dtype=torch.float64)
            q, _ = torch.linalg.qr(torch.tensor([[draw.uniform() for _ in range(c)] for _ in range(c)]))
            mix = (top * torch.diag(d.sqrt()) @ q.double()).to(device=x.device, dtype=x.dtype)
            noise = torch.einsum("bihw,ij->bjhw", draw.randn((b, c, h, w), x), mix)
        return (x + noise).clamp(0.0, 1.0)

    def jpeg(self, x: Tensor, draw: _Draw) -> Tensor:
        """JPEG round trip at a random quality in ``jpeg_quality`` (kornia's differentiable codec)."""
        quality = torch.tensor([float(draw.randint(*self.jpeg_quality))], device=x.device, dtype=x.dtype)
        return kornia.enhance.jpeg_codec_differentiable(x.clamp(0.0, 1.0), quality).clamp(0.0, 1.0)


def degrade_bsr(image: Tensor, generator: torch.Generator, scale: int = 4) -> Tensor:
    """:class:`BSRDegradation` with ``bsrgan_light``'s defaults: ``[B, 3, H, W]`` -> ``[B, 3, H/s, W/s]``."""
    return BSRDegradation(scale=scale)(image, generator)


__all__ = [
    "RESIZE_MODES",
    "BSRDegradation",
    "anisotropic_gaussian_kernel",
    "bicubic_downsample",
    "degrade_bsr",
    "isotropic_gaussian_kernel",
]
