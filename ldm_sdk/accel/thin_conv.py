"""3x3 convolutions with few output channels (``C_out <= 8``) as one GEMM to every tap's partial output plus
a Triton kernel that sums the nine shifted taps.

What: :func:`thin_conv3x3` is ``conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` (stride 1, zero
padding, no groups or dilation). The pixel rows of a channels_last ``x`` are a ``(N H W, C_in)`` matrix; one
GEMM with ``W_taps`` (``(C_in, 9 C_out)`` padded to a multiple of 8 columns,
``W_taps[:, (3 dy + dx) C_out + co] = weight[co, :, dy, dx]``) gives ``T``, each pixel's contribution to
each tap of each output channel, and a Triton kernel sums the taps that land on an output pixel::

    out[n, co, y, x] = bias[co] + sum_{dy, dx in 0..2} T[n, y + dy - 1, x + dx - 1, (3 dy + dx) C_out + co]

(terms whose source pixel lies outside the map are zero: the padding). The output is channels_last.
``backend="auto"`` runs this for channels_last CUDA fp16 / bf16 / fp32 inputs (weight of ``x``'s dtype, no
autograd, torch >= 2.8 for the float32-output GEMM), else :func:`thin_conv3x3_reference`; ``"triton"``
forces it (errors say why it cannot run), ``"reference"`` never runs it.

Why: cuDNN is slow for 3x3 convolutions with few output channels: on an H100 (fp16, channels_last,
``bench/op_roofline.py``, ``bench/results/op_roofline_h100.json``) the SD UNet's ``conv_out`` 320 -> 4 on
``[2, 320, 64, 64]`` took 20.7 us (batch 16: 78.3 us) and the kl-f8 decoder's ``conv_out`` 128 -> 3 on
``[1, 128, 512, 512]`` 110 us, while the GEMM ``rows @ W_taps`` alone took 4.1 / 21.6 / 33.2 us (keys
``tap_gemm_only_us``; padding ``C_out`` to 8 or 16 channels did not help cuDNN: ``cout_pad8_us``,
``cout_pad16_us``). The GEMM reads ``x`` once at full tensor-core rate; the tap sum reads ``T`` (36 or 32
float32 columns per pixel, the neighbours' rows mostly from L2) and writes the small output.

Numerics: ``T`` is a float32 GEMM output (``torch.mm(..., out_dtype=torch.float32)`` on CUDA: products of
the fp16 / bf16 inputs accumulated in float32, never rounded to half precision; on the CPU, under the
Triton interpreter, the same in float32 from upcast inputs). The kernel adds the nine taps and the bias in
float32 and rounds once to ``x.dtype``. So the result is the float32 convolution of the inputs up to
float32 summation order, rounded once: within one output ulp plus float32 noise of ``F.conv2d`` computed
in float32 or float64 from the same inputs (:func:`thin_conv3x3_reference`, on CUDA with TF32 off).
float32 inputs on CUDA go through cuBLAS's float32 GEMM, which follows torch's matmul precision setting
(``torch.backends.cuda.matmul.allow_tf32``, off by default).

:class:`FusedThinConv2d` is the ``nn.Conv2d`` class :func:`~ldm_sdk.accel.block_fusion.fuse_blocks`
switches thin 3x3 convolutions to (same Parameters; :func:`thin_conv_fusable` says which qualify).
``W_taps`` is formed from the weight on every call (a ``C_in x 9 C_out`` copy, device ops only), so it is
never stale, also inside a CUDA graph.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.conv_checks import check_conv3x3, kernel_input_problem, plain_conv
from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    KERNEL_DTYPES,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _pow2,
    _target_programs,
    _use_triton,
    _warps,
    launch,
    triton,
)

THIN_MAX_OUT = 8
"""The most output channels :func:`thin_conv_fusable` accepts (the kernel itself takes any number)."""

TILE = 4096
"""The most elements (output pixels x channels) per program of the tap sum."""

MIN_BLOCK_P = 32
"""Programs are shrunk (to reach about 4 per SM on small maps) down to this many output pixels."""

TAP_ALIGN = 8
"""``W_taps``'s columns are padded to a multiple of this: 16-byte rows for fp16 / bf16 tensor-core GEMMs."""

MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
"""Whether ``torch.mm`` takes ``out_dtype`` (torch >= 2.8: float32 output of fp16 / bf16 inputs on CUDA)."""


def _memory_format(x: Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def tap_weights(weight: Tensor) -> Tensor:
    """``W_taps``: ``(C_in, 9 C_out)`` padded with zero columns to a multiple of :data:`TAP_ALIGN`, in
    ``weight``'s dtype, ``W_taps[ci, (3 dy + dx) C_out + co] = weight[co, ci, dy, dx]``. Device ops only (a
    fill and one strided copy; a reshape and a pad took three kernels): capturable in a CUDA graph, no
    host-to-device copy."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    width = -(-9 * c_out // TAP_ALIGN) * TAP_ALIGN
    taps = weight.new_zeros(c_in, width)
    taps[:, : 9 * c_out].view(c_in, 3, 3, c_out).copy_(weight.permute(1, 2, 3, 0))
    return taps


def thin_conv3x3_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` computed in float32 (float64 for float64 inputs) from the
    inputs and rounded once to ``x.dtype``, in ``x``'s memory format: the fallback of ``backend="auto"``.
    On CUDA its float32 convolution follows torch's cuDNN TF32 setting (on by default), so the GPU tests
    take float64 ``F.conv2d`` as their oracle."""
    check_conv3x3(x, weight, bias, "thin_conv3x3")
    ct = torch.promote_types(x.dtype, torch.float32)
    out = F.conv2d(x.to(ct), weight.to(ct), bias.to(ct) if bias is not None else None, padding=1)
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _kernel_fits(x: Tensor, weight: Tensor) -> str | None:
    """None when the GEMM + tap-sum path can take these inputs, else why not (the bias may have any
    floating dtype: the kernel adds it in float32)."""
    return kernel_input_problem(x, weight)


def thin_conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` (stride 1, zero padding), the output in
    ``x``'s memory format: the tap GEMM + Triton tap sum (see the module doc) for channels_last CUDA inputs
    (``"auto"``; ``"triton"`` forces it), else :func:`thin_conv3x3_reference`. ``recorder``: record the
    Triton launch instead of making it (:mod:`ldm_sdk.accel.precompile`)."""
    check_conv3x3(x, weight, bias, "thin_conv3x3")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "triton":
        why_not = _kernel_fits(x, weight)
        if why_not is not None:
            raise ValueError(f"the Triton thin_conv3x3 kernel takes {why_not}; use backend='auto'")
    if backend == "triton" or (backend == "auto" and _auto_takes_kernel(x, weight, bias)):
        _use_triton(backend, "thin_conv3x3", x, weight, bias)  # "triton" with autograd recording: refuse
        return thin_conv3x3_triton(x, weight, bias, recorder=recorder)
    return thin_conv3x3_reference(x, weight, bias)


def _auto_takes_kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``backend="auto"`` runs the kernel path: a CUDA input Triton takes, no autograd, channels_last
    with a weight of its dtype, and ``torch.mm`` with a float32 output."""
    return (
        _use_triton("auto", "thin_conv3x3", x, weight, bias)
        and MM_OUT_DTYPE
        and _kernel_fits(x, weight) is None
    )


def _tap_gemm(rows: Tensor, w_taps: Tensor) -> Tensor:
    """``T = rows @ W_taps`` in float32: on CUDA (torch >= 2.8) without rounding the products' sums to half
    precision; elsewhere (the interpreter tests, older torch) from upcast operands."""
    if rows.is_cuda and MM_OUT_DTYPE:
        return torch.mm(rows, w_taps, out_dtype=torch.float32)
    return rows.float() @ w_taps.float()


def _plan(pixels: int, c_out: int, tile: int, target: int) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_C)``: all ``C_out`` channels (up to 128) of ``tile // BLOCK_C`` output pixels,
    halved down to :data:`MIN_BLOCK_P` pixels while that leaves fewer than ``target`` programs."""
    block_c = min(_pow2(c_out), 128, tile)
    block_p = max(1, min(tile // block_c, _pow2(pixels)))
    while block_p > MIN_BLOCK_P and -(-pixels // block_p) < target:
        block_p //= 2
    return block_p, block_c


def thin_conv3x3_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    tile: int = TILE,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`thin_conv3x3` through the tap GEMM and the Triton tap sum, for a channels_last ``x`` and a
    weight of ``x``'s dtype; returns a channels_last tensor. ``tile`` (a power of two >= 16) caps the
    elements per program; tests use small tiles to get many programs and partial tiles."""
    check_conv3x3(x, weight, bias, "thin_conv3x3")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    _check_kernel_input(x, "thin_conv3x3")
    why_not = _kernel_fits(x, weight)
    if why_not is not None:
        raise ValueError(f"the Triton thin_conv3x3 kernel takes {why_not}; use backend='auto'")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    out = torch.empty((n, c_out, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    pixels = n * h * w
    if pixels == 0 or c_out == 0:
        return out
    w_taps = tap_weights(weight)
    t = _tap_gemm(x.permute(0, 2, 3, 1).reshape(pixels, c_in), w_taps)  # (pixels, width) float32
    if bias is not None and bias.dtype not in KERNEL_DTYPES:
        bias = bias.float()
    block_p, block_c = _plan(pixels, c_out, tile, _target_programs(x))
    grid = (-(-pixels // block_p), -(-c_out // block_c))
    launch(
        _tap_sum_kernel,
        grid,
        recorder,
        t,
        bias if bias is not None else t,  # an unread stand-in pointer without bias
        out,
        pixels,
        h,
        w,
        c_out,
        t.shape[1],
        bias is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=_warps(block_p * block_c),
    )
    return out


def thin_conv_fusable(conv: nn.Module) -> str | None:
    """None when ``conv`` is a thin plain 3x3 convolution :class:`FusedThinConv2d` takes: type exactly
    ``nn.Conv2d``, 3x3, stride 1, padding 1, dilation 1, groups 1, zero padding, at most
    :data:`THIN_MAX_OUT` output channels; else a short reason."""
    if not plain_conv(conv, 3):
        return "not a plain 3x3 stride-1 padding-1 nn.Conv2d"
    out_channels = cast(nn.Conv2d, conv).out_channels
    if out_channels > THIN_MAX_OUT:
        return f"{out_channels} output channels (thin: <= {THIN_MAX_OUT})"
    return None


class FusedThinConv2d(nn.Conv2d):
    """A thin 3x3 ``nn.Conv2d`` (see :func:`thin_conv_fusable`) running :func:`thin_conv3x3` in eval mode on
    inputs the kernel path takes; training, non-4-D inputs and (with ``"auto"``) inputs the kernel path does
    not take run ``nn.Conv2d.forward`` as before (not the float32 reference: no slower than unfused)."""

    unfused_class: ClassVar[type[nn.Module]] = nn.Conv2d
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dim() != 4:
            return nn.Conv2d.forward(self, x)
        backend = self.fusion_backend
        if backend == "auto" and not _auto_takes_kernel(x, self.weight, self.bias):
            return nn.Conv2d.forward(self, x)
        return thin_conv3x3(x, self.weight, self.bias, backend=backend, recorder=self.kernel_recorder)


if triton is not None:
    from ldm_sdk.kernels.thin_conv import (
        _tap_sum_kernel,
    )


__all__ = [
    "THIN_MAX_OUT",
    "FusedThinConv2d",
    "tap_weights",
    "thin_conv3x3",
    "thin_conv3x3_reference",
    "thin_conv3x3_triton",
    "thin_conv_fusable",
]
