"""Softmax over the last dimension as one Triton kernel that holds a whole row in registers, written in
place: the first stage's attention probabilities.

Why: the kl-f8 decoder's mid-block attention (:mod:`ldm_sdk.accel.vae_attention`) forms 4096 x 4096 fp16
scores; torch's ``softmax`` over them took 56 us on an H100 (32 MiB read and 32 MiB written: 1.2 TB/s),
half of the attention's 115 us (``bench/results/op_roofline_session5_b2_h100.json``, key ``decode_b1``,
kernel ``cunn_SoftMaxForwardReg``). One program per row reads it once, keeps it in registers and writes the
probabilities over the scores, which the attention does not need again.

Numerics: the row is converted to float32, its maximum subtracted, ``exp`` taken in float32, the sum
formed in float32 and each value multiplied by the reciprocal of the sum, then rounded once to the input
dtype -- the steps of torch's softmax, with Triton's ``exp`` (within a few float32 ulps of the exact
value) and a tree-ordered sum; the outputs are within one output ulp (plus float32 noise) of a float64
softmax (tested).

``backend="auto"`` runs the kernel for CUDA tensors of fp16 / bf16 / fp32 with rows of at most
:data:`MAX_ROW` values when Triton imports and no gradient is needed, else ``torch.softmax``; ``"triton"``
always runs the kernel (errors say why it cannot); ``"reference"`` never does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_sdk.accel.triton_kernels import (
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _pow2,
    _use_triton,
    launch,
    triton,
)

MAX_ROW = 16384
"""Longest row the kernel holds in registers (64 float32 values per thread at 8 warps)."""


def softmax_(x: Tensor, *, backend: Backend = "auto", recorder: KernelRecorder | None = None) -> Tensor:
    """Softmax over the last dimension of ``x``, in place when the kernel runs (contiguous rows); returns
    the probabilities (``x`` itself, or ``torch.softmax(x, -1)`` on the reference path)."""
    if x.dim() == 0:
        raise ValueError("softmax_ needs at least one dimension, got a 0-d tensor")
    fits = x.shape[-1] <= MAX_ROW and x.is_contiguous()
    if _use_triton(backend, "softmax_", x) and (backend == "triton" or fits):
        return softmax_triton_(x, recorder=recorder)
    return torch.softmax(x, dim=-1)


def softmax_triton_(x: Tensor, *, recorder: KernelRecorder | None = None) -> Tensor:
    """:func:`softmax_` through the Triton kernel, in place; ``x`` must be contiguous with rows of at most
    :data:`MAX_ROW` values."""
    _check_kernel_input(x, "softmax_")
    if not x.is_contiguous():
        raise ValueError(
            f"softmax_triton_ writes in place and needs a contiguous tensor, got strides {tuple(x.stride())} "
            f"for shape {tuple(x.shape)}; use softmax_(..., backend='auto')"
        )
    cols = x.shape[-1]
    if cols > MAX_ROW:
        raise ValueError(
            f"softmax_triton_ holds a row in registers: at most {MAX_ROW} values, got {cols}; use "
            "backend='auto' or 'reference'"
        )
    rows = x.numel() // cols if cols else 0
    if rows == 0:
        return x
    block = max(16, _pow2(cols))
    warps = min(8, max(1, block // 256))  # 8 values per thread up to 2048 columns, then 8 warps
    launch(_softmax_rows_kernel, (rows,), recorder, x, cols, BLOCK=block, num_warps=warps)
    return x


if triton is not None:
    from ldm_sdk.kernels.row_softmax import (
        _softmax_rows_kernel,
    )


__all__ = ["MAX_ROW", "softmax_", "softmax_triton_"]
