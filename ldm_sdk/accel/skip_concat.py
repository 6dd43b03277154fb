"""The UNet's skip concatenations (``torch.cat([h, skip], dim=1)``) of channels_last maps as one Triton copy.

Why: each output block of the UNet starts with the channel concatenation of the path's map and the skip
saved on the way down. torch's concatenation kernel moved them at about 1.7 TB/s on an H100 -- 0.59 ms of
the 31.7 ms SD-1.5 step at batch 16 for about 1 GB of reads and writes, 0.10 ms of 5.9 ms at batch 2
(``bench/results/profile_b{2,16}_session5.json``, ``CatArrayBatchedCopy``), where a copy runs at about
2.9 TB/s. The kernel tiles the output's pixel rows x channels (as the other copy kernels here,
:func:`~ldm_sdk.accel.triton_kernels.launch_over_pixels`) and loads each tile's columns from whichever
input holds them. A copy: the same bits as ``torch.cat``.

:func:`concat_channels` runs it for two 4-D channels_last CUDA maps of one dtype (fp16 / bf16 / fp32) and
one batch and size, without autograd (``backend="auto"``), else ``torch.cat``; ``"triton"`` forces the
kernel (errors say why it cannot), ``"reference"`` never runs it. :class:`FusedUNetModel` is the
``UNetModel`` class :func:`~ldm_sdk.accel.block_fusion.fuse_blocks` switches a UNet to: its
:meth:`~ldm_sdk.models.unet.UNetModel.concat_skip` uses it (same Parameters, same everything else).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _memory_format,
    _use_triton,
    launch_over_pixels,
    triton,
)
from ldm_sdk.models.unet import UNetModel

TILE = 4096
"""Elements per program."""


def _fits(a: Tensor, b: Tensor) -> str | None:
    """None when the kernel takes ``a`` and ``b``, else what it takes."""
    for t in (a, b):
        if t.dim() != 4 or _memory_format(t) != torch.channels_last:
            return f"4-D channels_last maps, got shape {tuple(t.shape)} with strides {tuple(t.stride())}"
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        return f"maps of one batch and size, got {tuple(a.shape)} and {tuple(b.shape)}"
    if a.dtype != b.dtype or a.device != b.device:
        return f"maps of one dtype and device, got {a.dtype} / {a.device} and {b.dtype} / {b.device}"
    return None


def concat_channels(
    a: Tensor, b: Tensor, *, backend: Backend = "auto", recorder: KernelRecorder | None = None
) -> Tensor:
    """``torch.cat([a, b], dim=1)`` (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    problem = _fits(a, b)
    if backend == "triton" and problem is not None:
        raise ValueError(f"the concatenation kernel takes {problem}; use backend='auto'")
    if problem is None and _use_triton(backend, "concat_channels", a, b):
        return concat_channels_triton(a, b, recorder=recorder)
    return torch.cat([a, b], dim=1)


def concat_channels_triton(a: Tensor, b: Tensor, *, recorder: KernelRecorder | None = None) -> Tensor:
    """:func:`concat_channels` through the kernel (channels_last maps of one batch, size, dtype)."""
    problem = _fits(a, b)
    if problem is not None:
        raise ValueError(f"the concatenation kernel takes {problem}; use backend='auto'")
    _check_kernel_input(a, "concat_channels")
    n, ca, h, w = a.shape
    cb = b.shape[1]
    out = torch.empty((n, ca + cb, h, w), device=a.device, dtype=a.dtype, memory_format=torch.channels_last)
    pixels = n * h * w
    if out.numel() == 0:
        return out
    launch_over_pixels(_concat_kernel, recorder, pixels, ca + cb, TILE, a, b, out, pixels, ca, cb)
    return out


class FusedUNetModel(UNetModel):
    """``UNetModel`` whose skip concatenations run :func:`concat_channels`."""

    unfused_class: ClassVar[type[nn.Module]] = UNetModel
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def concat_skip(self, h: Tensor, skip: Tensor) -> Tensor:
        return concat_channels(h, skip, backend=self.fusion_backend, recorder=self.kernel_recorder)


if triton is not None:
    from ldm_sdk.kernels.skip_concat import (
        _concat_kernel,
    )


__all__ = ["FusedUNetModel", "concat_channels", "concat_channels_triton"]
