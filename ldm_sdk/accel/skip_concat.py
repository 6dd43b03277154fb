"""The UNet's skip concatenations (``torch.cat([h, skip], dim=1)``) of channels_last maps as one Triton copy.

Why: each output block of the UNet starts with the channel concatenation of the path's map and the skip
saved on the way down. torch's concatenation kernel moved them at about 1.7 TB/s on an H100 -- 0.59 ms of
the 31.7 ms SD-1.5 step at batch 16 for about 1 GB of reads and writes, 0.10 ms of 5.9 ms at batch 2
(``bench/results/profile_b{2,16}_session5.json``, ``CatArrayBatchedCopy``), where a copy runs at about
2.9 TB/s. The kernel tiles the output's pixel rows x channels (as the other copy kernels here,
:func:`~ldm_sdk.accel.triton_kernels.launch_over_pixels`) and loads each tile's columns from whichever
input holds them. A copy: the same bits as ``torch.cat``.

:func:`concat_channels` runs it for two 4-D channels_last CUDA maps of one dtype (fp16 / bf16 / fp32) and
size, without autograd (``backend="auto"``), else ``torch.cat``; ``"triton"`` forces the
kernel (errors say why it cannot), ``"reference"`` never runs it. The second map's batch may divide the
first's: it is then repeated (the skips saved before the guidance copies part, which the UNet no longer
copies itself: the kernel reads output row ``p``'s values from the skip's row ``p mod`` its rows, with no
copy of its own). The fused UNet's
:meth:`~ldm_sdk.models.unet.UNetModel.concat_skip` uses it (:class:`ldm_sdk.accel.fused_unet.FusedUNetModel`).
"""

from __future__ import annotations

import torch
from torch import Tensor

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
from ldm_sdk.models.attention import repeat_batch

TILE = 4096
"""Elements per program."""


def _fits(a: Tensor, b: Tensor) -> str | None:
    """None when the kernel takes ``a`` and ``b``, else what it takes."""
    for t in (a, b):
        if t.dim() != 4 or _memory_format(t) != torch.channels_last:
            return f"4-D channels_last maps, got shape {tuple(t.shape)} with strides {tuple(t.stride())}"
    if a.shape[2:] != b.shape[2:] or b.shape[0] == 0 or a.shape[0] % b.shape[0]:
        return (
            f"maps of one size, the second's batch dividing the first's, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.dtype != b.dtype or a.device != b.device:
        return f"maps of one dtype and device, got {a.dtype} / {a.device} and {b.dtype} / {b.device}"
    return None


def concat_channels(
    a: Tensor, b: Tensor, *, backend: Backend = "auto", recorder: KernelRecorder | None = None
) -> Tensor:
    """``torch.cat([a, b], dim=1)`` (see the module doc); a ``b`` whose batch divides ``a``'s is repeated,
    ``[b; b; ...]``, as the skips that the guidance copies share
    (:meth:`~ldm_sdk.models.unet.UNetModel.forward`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    problem = _fits(a, b)
    if backend == "triton" and problem is not None:
        raise ValueError(f"the concatenation kernel takes {problem}; use backend='auto'")
    if problem is None and _use_triton(backend, "concat_channels", a, b):
        return concat_channels_triton(a, b, recorder=recorder)
    if b.shape[0] and a.shape[0] != b.shape[0] and a.shape[0] % b.shape[0] == 0:
        b = repeat_batch(b, a.shape[0] // b.shape[0])
    return torch.cat([a, b], dim=1)


def concat_channels_triton(a: Tensor, b: Tensor, *, recorder: KernelRecorder | None = None) -> Tensor:
    """:func:`concat_channels` through the kernel (channels_last maps of one size and dtype, ``b``'s batch
    dividing ``a``'s)."""
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
    pixels_b = b.shape[0] * h * w
    launch_over_pixels(_concat_kernel, recorder, pixels, ca + cb, TILE, a, b, out, pixels, pixels_b, ca, cb)
    return out


if triton is not None:
    from ldm_sdk.kernels.skip_concat import (
        _concat_kernel,
    )


__all__ = ["concat_channels", "concat_channels_triton"]
