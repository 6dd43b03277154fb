"""Nearest-neighbour 2x upsampling of a channels_last map as one Triton kernel, and the UNet ``Upsample``
that uses it.

What: :func:`nearest_upsample2x` is ``F.interpolate(x, scale_factor=2, mode="nearest")`` for a 4-D
channels_last tensor: each program loads a ``BLOCK_P x BLOCK_C`` tile of input pixels (rows of contiguous
channels) once and stores it four times, at output pixels ``(2i, 2j)``, ``(2i, 2j + 1)``, ``(2i + 1, 2j)``
and ``(2i + 1, 2j + 1)``. It is a copy, so the result is bit-identical to ``F.interpolate``. Other layouts,
devices and dtypes go to ``F.interpolate`` (``backend="auto"``); ``"triton"`` forces the kernel (errors say
why it cannot run), ``"reference"`` never runs it.

Why: torch's channels_last nearest kernel moved the SD-1.5 UNet's three upsamplings at batch 16 (image
batch 8 with guidance) at about 0.4 TB/s: 0.43 ms of a 35 ms step for 170 MB of reads and writes (H100,
``bench/profile_unet.py --batch 16``). The kernel reads each input pixel once and writes each output pixel
once with 16-byte vector accesses. The UNet's ``Upsample`` keeps its 3x3 convolution after it (the
sub-pixel form that replaces both in the first stage's decoder, :mod:`ldm_sdk.accel.subpixel`, measured
slower for the UNet's wide channels on small maps).

:class:`FusedUNetUpsample` is the ``Upsample`` class :func:`~ldm_sdk.accel.block_fusion.fuse_blocks`
switches the UNet's upsampling layers to (same Parameters; :func:`~ldm_sdk.accel.block_fusion.unfuse_blocks`
switches back).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _use_triton,
    launch_over_pixels,
    triton,
)
from ldm_sdk.models import unet

TILE = 4096
"""Elements per program (``BLOCK_P x BLOCK_C``)."""


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise ValueError(f"nearest_upsample2x takes a 4-D (N, C, H, W) tensor, got {got}")


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last)


def nearest_upsample2x_reference(x: Tensor) -> Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")`` in ``x``'s memory format."""
    _check_input(x)
    return F.interpolate(x, scale_factor=2, mode="nearest")


def nearest_upsample2x(
    x: Tensor, *, backend: Backend = "auto", recorder: KernelRecorder | None = None
) -> Tensor:
    """Nearest 2x upsampling of ``(N, C, H, W)`` -> ``(N, C, 2H, 2W)`` (see the module doc)."""
    _check_input(x)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if _use_triton(backend, "nearest_upsample2x", x) and (backend == "triton" or _channels_last(x)):
        return nearest_upsample2x_triton(x, recorder=recorder)
    return nearest_upsample2x_reference(x)


def nearest_upsample2x_triton(
    x: Tensor, *, tile: int = TILE, recorder: KernelRecorder | None = None
) -> Tensor:
    """:func:`nearest_upsample2x` through the Triton kernel, for a channels_last ``x``. ``tile`` (a power of
    two >= 16) caps the elements per program; tests use small tiles to get partial row and column tiles."""
    _check_input(x)
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    _check_kernel_input(x, "nearest_upsample2x")
    if not _channels_last(x):
        raise ValueError(
            "the Triton nearest_upsample2x kernel takes channels_last input (x.contiguous(memory_format="
            "torch.channels_last)); use backend='auto' for other layouts"
        )
    n, c, h, w = x.shape
    y = torch.empty((n, c, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    pixels = n * h * w
    if pixels == 0 or c == 0:
        return y
    launch_over_pixels(_nearest2x_nhwc_kernel, recorder, pixels, c, tile, x, y, pixels, h, w, c)
    return y


class FusedUNetUpsample(unet.Upsample):
    """The UNet's ``Upsample`` with the upsampling as :func:`nearest_upsample2x` (channels_last input on
    CUDA; anything else takes ``F.interpolate`` as before), then its conv."""

    unfused_class: ClassVar[type[nn.Module]] = unet.Upsample
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            return unet.Upsample.forward(self, x)
        x = nearest_upsample2x(x, backend=self.fusion_backend, recorder=self.kernel_recorder)
        return cast(nn.Conv2d, self.conv)(x) if self.use_conv else x


def unet_upsample_fusable(module: unet.Upsample) -> str | None:
    if module.use_conv and type(module.conv) is not nn.Conv2d:
        return "its conv is not a plain nn.Conv2d"
    return None


if triton is not None:
    from ldm_sdk.kernels.nearest_upsample import (
        _nearest2x_nhwc_kernel,
    )


__all__ = [
    "FusedUNetUpsample",
    "nearest_upsample2x",
    "nearest_upsample2x_reference",
    "nearest_upsample2x_triton",
    "unet_upsample_fusable",
]
