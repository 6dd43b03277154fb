"""3x3 convolutions on tiny channels_last maps as one Triton im2col kernel and one cuBLAS GEMM.

What
----
* :func:`im2col3x3` -- the ``(N H W, 9 C)`` im2col matrix of a channels_last ``(N, C, H, W)`` map (padding
  1), tap-major: ``cols[(n H + y) W + x, (3 dy + dx) C + c] = x[n, c, y + dy - 1, x + dx - 1]``, or 0
  where that pixel lies outside the map. One Triton kernel (a copy: bit-exact).
* :func:`conv_weight_matrix` -- the ``(9 C_in, C_out)`` matrix ``W9[(3 dy + dx) C_in + c, co] =
  weight[co, c, dy, dx]``. A channels_last weight's memory is ``(C_out, 3, 3, C_in)``, so
  ``weight.permute(0, 2, 3, 1).reshape(C_out, 9 C_in).t()`` is a view (no copy); for any other weight
  layout the reshape copies the weight (``9 C_in C_out`` values: 59 MB for a 2560 -> 1280 fp16 conv, so
  :func:`gemm_conv_pays` wants channels_last weights).
* :func:`gemm_conv3x3` -- ``F.conv2d(x, weight, bias, stride=1, padding=1)`` as ``cols @ W9`` (``addmm``
  with the bias). The ``(N H W, C_out)`` GEMM output is NHWC memory, so it is returned as a channels_last
  ``(N, C_out, H, W)`` view, without a copy. ``backend="auto"`` takes this path for channels_last CUDA
  fp16 / bf16 / fp32 inputs with a weight (and bias) of ``x``'s dtype and no autograd, else ``F.conv2d``;
  ``"triton"`` forces it (errors say why it cannot run); ``"reference"`` is ``F.conv2d``.
* :func:`gemm_conv_pays` -- whether the GEMM path beats cuDNN for a conv (the dispatch rule below).

Why
---
cuDNN runs the SD-1.5 UNet's lowest-level 3x3 convolutions poorly when there are few output pixels. On an
H100 (fp16, channels_last, ``bench/op_roofline.py``, ``bench/results/op_roofline_h100.json``, keys ``us``
(cuDNN) / ``gemm_only_us`` (the same product as one cuBLAS GEMM) / ``im2col_gemm_us`` (torch im2col +
GEMM)):

===============================  ====  ==========  =========  ======================
conv, input                      rows  cuDNN (us)  GEMM (us)  torch im2col+GEMM (us)
===============================  ====  ==========  =========  ======================
1280 -> 1280, [2, 1280, 8, 8]     128        22.5       11.7                    28.5
2560 -> 1280, [2, 2560, 8, 8]     128        34.6       29.0                    51.6
640 -> 1280, [2, 640, 16, 16]     512        18.1       13.9                    33.0
1280 -> 1280, [2, 1280, 16, 16]   512        30.7       32.5                    62.3
1280 -> 1280, [16, 1280, 8, 8]   1024        56.4       43.1                   106.2
2560 -> 1280, [16, 2560, 8, 8]   1024        93.3       85.0                   200.0
===============================  ====  ==========  =========  ======================

(rows = ``N H W``, the GEMM's M; batch 2 is image batch 1 with guidance.) With 128 output rows cuDNN
reaches 167 TFLOP/s (1280 -> 1280); the GEMM with ``K = 9 C_in`` is 1.9x faster there, 1.2x for
2560 -> 1280. Building ``cols`` with torch ops (pad, nine slices, a stack) costs more than the GEMM saves,
so the im2col is one kernel: it reads the map (from L2 after the first tap) and writes ``cols`` once
(``128 x 11520`` fp16 = 2.9 MB at 128 rows and 1280 channels, about 1-2 us of HBM writes).

Dispatch rule (:func:`gemm_conv_pays`): a channels_last CUDA fp16 / bf16 map and channels_last weight of its
dtype, at most :data:`GEMM_CONV_MAX_ROWS` output rows (``N H W``) and at least
:data:`GEMM_CONV_MIN_CHANNELS` input channels. The 128-row convs win clearly (about 11 and 6 us minus the
im2col); at 512 rows cuDNN is already faster than the GEMM alone for 1280 -> 1280; at 1024 rows the GEMM
wins by 13 / 8 us before the im2col writes 24 / 47 MB of ``cols`` (10-20 us), so about even. The limit
starts at 256 rows (between the clear win and the first loss); it is meant to be tuned on the GPU. Narrow
maps (fewer than 256 channels) are not measured and are left to cuDNN.

Numerics
--------
The im2col is a copy (bit-exact; the padding is +0). The GEMM multiplies the fp16 / bf16 values exactly,
accumulates in float32 (cuBLAS's compute type for half-precision GEMMs, as cuDNN's convolutions) and rounds
to ``x.dtype``; the bias (``addmm``) goes into the GEMM's epilogue. cuBLAS picks split-K kernels for these
short, deep GEMMs, whose partial sums are rounded on the way: outputs that cancel to near zero can be many
of their own ulps off (up to ~180 measured at ``[2, 1280, 8, 8]``, H100), while every output stays within a
few half-precision ulps of the largest one -- the bound the GPU tests assert against float64 ``F.conv2d``,
the same kind of error as cuDNN's own split-K convolutions.

The GEMM follows torch's global cuBLAS settings like every other GEMM of the model (the attention and
feed-forward projections): ``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction`` /
``allow_bf16_reduced_precision_reduction`` (True by default) allow cuBLAS to reduce split-K partial sums
in half precision; a caller who wants strictly float32 reductions everywhere turns them off globally.
float32 inputs go through cuBLAS's float32 GEMM, which follows ``torch.backends.cuda.matmul.allow_tf32``
(off by default; ``F.conv2d`` follows ``torch.backends.cudnn.allow_tf32``, on by default).

Limits
------
Stride 1, padding 1, no dilation or groups (the caller checks the conv is such a plain one). No backward:
with autograd recording ``"auto"`` takes ``F.conv2d`` and ``"triton"`` refuses. Offsets are 64-bit.
Triton runs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel.conv_checks import check_conv3x3, check_map, kernel_input_problem, nhwc
from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _pow2,
    _use_triton,
    _warps,
    launch,
    triton,
)

GEMM_CONV_MAX_ROWS = 256
"""The most output rows (``N H W``) :func:`gemm_conv_pays` sends to the GEMM path (a starting value: 128 rows
win clearly on an H100, 512 lose; see the module doc)."""

GEMM_CONV_MIN_CHANNELS = 256
"""The fewest input channels :func:`gemm_conv_pays` sends to the GEMM path (narrower convs are unmeasured)."""

TILE = 4096
"""Elements (rows x channels) per program of the im2col kernel."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _kernel_fits(x: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """None when the im2col + GEMM path can take these inputs, else what it takes instead."""
    return kernel_input_problem(x, weight, bias)


# -- the pieces ----------------------------------------------------------------------------------------------
def im2col3x3(x: Tensor, *, tile: int = TILE, recorder: KernelRecorder | None = None) -> Tensor:
    """The ``(N H W, 9 C)`` contiguous im2col matrix of a channels_last ``(N, C, H, W)`` map for a 3x3 kernel
    with padding 1, tap-major (see the module doc), in ``x``'s dtype, by one Triton kernel.

    The grid is (row tiles, 9 taps, channel tiles): each program copies a ``BLOCK_P x BLOCK_C`` tile of one
    tap (one masked load of the shifted pixel rows, one store of contiguous channel runs). The tap axis
    multiplies the programs by nine, which the target maps need: 128 rows x 1280 channels are only 40
    tiles of ``TILE`` elements for 132 SMs, 360 with the taps; the nine reads of each input tile are L2
    hits (the map is 0.3-5 MB). ``tile`` (a power of two >= 16) caps the elements per program; tests use
    small tiles for partial row and channel tiles. ``recorder``: record the launch instead of making it
    (:mod:`ldm_sdk.accel.precompile`; the output is then left unwritten)."""
    check_map(x, "im2col3x3")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    if not nhwc(x):
        raise ValueError(
            "im2col3x3 takes a channels_last x (x.contiguous(memory_format=torch.channels_last)), got "
            f"strides {x.stride()} for shape {tuple(x.shape)}"
        )
    _check_kernel_input(x, "im2col3x3")
    _use_triton("triton", "im2col3x3", x)  # autograd recording: refuse (the copy has no backward)
    n, c, h, w = x.shape
    rows = n * h * w
    cols = torch.empty((rows, 9 * c), device=x.device, dtype=x.dtype)
    if rows == 0 or c == 0:
        return cols
    block_c = min(_pow2(c), 128, tile)
    block_p = max(1, min(tile // block_c, _pow2(rows)))
    grid = (triton.cdiv(rows, block_p), 9, triton.cdiv(c, block_c))
    launch(
        _im2col3x3_kernel,
        grid,
        recorder,
        x,
        cols,
        rows,
        h,
        w,
        c,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=_warps(block_p * block_c),
    )
    return cols


def conv_weight_matrix(weight: Tensor) -> Tensor:
    """``W9``, the ``(9 C_in, C_out)`` matrix of a ``(C_out, C_in, 3, 3)`` weight:
    ``W9[(3 dy + dx) C_in + c, co] = weight[co, c, dy, dx]``. A view of a channels_last weight (no copy); a
    copy for any other layout."""
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"conv_weight_matrix takes a (C_out, C_in, 3, 3) weight, got {got}")
    c_out, c_in = weight.shape[0], weight.shape[1]
    return weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_in).t()


def gemm_conv3x3_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    tile: int = TILE,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`gemm_conv3x3` through :func:`im2col3x3` and one ``torch.mm`` / ``torch.addmm``, for a
    channels_last ``x`` with a weight (and bias) of its dtype; the output is a channels_last
    ``(N, C_out, H, W)`` view of the ``(N H W, C_out)`` GEMM output."""
    check_conv3x3(x, weight, bias, "gemm_conv3x3")
    why_not = _kernel_fits(x, weight, bias)
    if why_not is not None:
        raise ValueError(f"the im2col + GEMM conv path takes {why_not}; use backend='auto'")
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    cols = im2col3x3(x, tile=tile, recorder=recorder)
    w9 = conv_weight_matrix(weight)
    out = torch.mm(cols, w9) if bias is None else torch.addmm(bias, cols, w9)
    return out.view(n, h, w, c_out).permute(0, 3, 1, 2)


# -- dispatch ------------------------------------------------------------------------------------------------
def gemm_conv3x3(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=1)`` for a 3x3 ``weight``: the im2col kernel + one GEMM
    for channels_last CUDA inputs with a weight (and bias) of ``x``'s dtype and no autograd (``"auto"``;
    ``"triton"`` forces it), else ``F.conv2d`` (``"reference"`` always). Whether the GEMM path is the faster
    one is :func:`gemm_conv_pays`'s question, not this function's."""
    check_conv3x3(x, weight, bias, "gemm_conv3x3")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "triton":
        why_not = _kernel_fits(x, weight, bias)
        if why_not is not None:
            raise ValueError(f"the im2col + GEMM conv path takes {why_not}; use backend='auto'")
        _use_triton(backend, "im2col3x3", x, weight, bias)  # autograd recording: refuse
        return gemm_conv3x3_triton(x, weight, bias, recorder=recorder)
    if _use_triton(backend, "im2col3x3", x, weight, bias) and _kernel_fits(x, weight, bias) is None:
        return gemm_conv3x3_triton(x, weight, bias, recorder=recorder)
    return F.conv2d(x, weight, bias, stride=1, padding=1)


def _gemm_conv_rejection(x: Tensor, weight: Tensor) -> str | None:
    """None when :func:`gemm_conv_pays`, else why not (the device is checked last, so the CPU tests see the
    other reasons)."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.dim() != 4 or weight.dim() != 4:
        return "not a 4-D map and a 4-D weight"
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        return f"weight {tuple(weight.shape)} is not a 3x3 kernel over x's {x.shape[1]} channels"
    if x.dtype not in _HALF_DTYPES or weight.dtype != x.dtype:
        return f"dtypes x {x.dtype}, weight {weight.dtype}: the GEMM path pays for fp16 / bf16 pairs"
    if not nhwc(x) or not nhwc(weight):
        return "x and weight must both be channels_last (a non-channels_last weight is copied every call)"
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    if rows > GEMM_CONV_MAX_ROWS:
        return f"{rows} output rows > GEMM_CONV_MAX_ROWS = {GEMM_CONV_MAX_ROWS}: cuDNN is as fast or faster"
    if x.shape[1] < GEMM_CONV_MIN_CHANNELS:
        return f"{x.shape[1]} input channels < GEMM_CONV_MIN_CHANNELS = {GEMM_CONV_MIN_CHANNELS}"
    if triton is None:
        return "triton is not installed"
    if not x.is_cuda or weight.device != x.device:
        return f"x on {x.device}, weight on {weight.device}: the GEMM path pays on CUDA only"
    return None


def gemm_conv_pays(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`gemm_conv3x3`'s im2col + GEMM beats cuDNN for ``conv2d(x, weight, padding=1)`` (a plain
    3x3 stride-1 conv; the caller checks stride, padding, dilation and groups): a channels_last CUDA fp16 /
    bf16 map with a channels_last weight of its dtype, at most :data:`GEMM_CONV_MAX_ROWS` output rows
    (``N H W``) and at least :data:`GEMM_CONV_MIN_CHANNELS` input channels (measurements in the module
    doc)."""
    return _gemm_conv_rejection(x, weight) is None


if triton is not None:
    from ldm_sdk.kernels.small_conv import (
        _im2col3x3_kernel,
    )


__all__ = [
    "GEMM_CONV_MAX_ROWS",
    "GEMM_CONV_MIN_CHANNELS",
    "TILE",
    "conv_weight_matrix",
    "gemm_conv3x3",
    "gemm_conv3x3_triton",
    "gemm_conv_pays",
    "im2col3x3",
]
