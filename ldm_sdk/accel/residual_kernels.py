"""Fused residual add + LayerNorm and bias + residual add as Triton kernels, with pure-torch references.

What
----
* :func:`add_layer_norm` -- ``s = y + residual`` (the new residual stream of a transformer block) and
  ``n = layer_norm(s)`` over the last dimension, in one kernel that reads ``y`` and ``residual`` once and
  writes ``s`` and ``n`` once (eager: an add kernel, then a LayerNorm kernel that reads ``s`` back).
  ``carry_bias`` adds a bias to the returned ``s`` only: the bias of the feed-forward output projection,
  whose bias-free GEMM then accumulates into ``s`` in place (``s.addmm_(h, W.t())``), so the feed-forward's
  residual add needs no kernel of its own. ``input_bias`` / ``residual_bias`` add biases to ``y`` / the
  residual before the sum: the biases of the layers that produced them, run as bias-free GEMMs (cuBLAS's
  bias epilogue picked kernels up to 1.7x slower than the plain GEMM at the SD-1.5 transformer's
  ``(B 4096, 320) x (320, 320)`` shape on an H100, ``bench/results/op_roofline_h100.json``).
* :func:`layer_norm` -- the same kernel without a residual: a LayerNorm over the last dim (a transformer
  block's first norm), one read and one write, the row's statistics in float32 registers; ``input_bias``
  normalises ``x + input_bias`` (rounded once to ``x.dtype``, as a biased GEMM would have stored it).
* :func:`bias_residual_add` -- ``y + bias[c] + residual`` for a convolution output ``y`` ``(N, C, *spatial)``
  whose bias add was split off (or never fused, e.g. the time-embedding add of a ResBlock) and a skip
  connection, in one elementwise kernel instead of two broadcast / add kernels.
* :func:`add_layer_norm_reference` / :func:`bias_residual_add_reference` -- the same maths in torch, in
  float32: the fallback where Triton or CUDA is missing (and when autograd needs a backward) and the tests'
  oracle.

``backend="auto"`` (the default of the dispatching functions) runs the Triton kernel when the input is a
CUDA tensor of dtype fp16 / bf16 / fp32, Triton imports, no gradient is needed and the sizes are within the
kernels' limits (below); otherwise the reference. ``"triton"`` always runs the kernel (errors say why it
cannot), ``"reference"`` never does. Dispatch is :func:`ldm_sdk.accel.triton_kernels._use_triton`.

Why
---
A profile of the CUDA-graph-replayed SD-1.5 UNet step on an H100 showed about 120 generic broadcast
bias / time-embedding add kernels and about 86 residual adds per step, each a full read / write pass over
an activation. :func:`bias_residual_add` removes one or two of those passes per use (the bias add and the
skip add share one read of ``y`` and one write); :func:`add_layer_norm` removes the write and re-read of the
residual sum between a transformer block's add and its next LayerNorm.

Numerics
--------
* Everything is computed in float32 (``float64`` inputs are computed in float64 by the references and are
  not taken by the kernels) and each output is rounded once to the input dtype.
* ``add_layer_norm``: ``s`` is the float32 sum rounded to ``y.dtype`` -- for fp16 / bf16 that is the
  correctly rounded sum (float32 holds more than twice their precision, so the double rounding is
  innocuous), equal to eager ``y + residual``. ``n`` is computed from the *rounded* ``s`` (so it is the
  LayerNorm of the residual stream the model carries on, as in eager ``n = F.layer_norm(y + residual)``):
  mean, then the biased variance as ``sum((s - mean)^2) / C`` over the row held in registers (two passes, no
  sum / sum-of-squares cancellation), ``rstd = 1 / sqrt_rn(var + eps)``, ``n = (s - mean) * rstd * w + b``.
  The float32 result differs from torch's float32 LayerNorm by a few float32 ulps, so after rounding to
  fp16 / bf16 they are equal or one output ulp apart.
* ``bias_residual_add``: ``(y + bias) + residual`` in float32, rounded once -- the order of eager
  ``residual + conv(x)`` with the bias inside the convolution. The unfused half-precision path rounds after
  each add; the fused one rounds once, so it is at least as accurate.

Layouts and limits
------------------
* ``add_layer_norm``: ``y`` and ``residual`` are ``(..., C)`` of one shape and dtype; non-contiguous inputs
  are made contiguous (one copy) and the outputs are contiguous. One program normalises ``BLOCK_R`` rows of
  ``BLOCK_C = next_pow2(C)`` columns (``BLOCK_R x BLOCK_C`` about 2048 elements), a whole row in one tile, so
  ``C`` is limited to :data:`MAX_LN_COLUMNS` (8192; SD-1.5 uses 320 .. 1280); above it ``"auto"`` uses the
  reference and ``"triton"`` raises.
* ``bias_residual_add``: ``y`` NCHW-contiguous (any number of spatial dims, 3-D ``(N, C, T)`` included) or
  4-D channels_last is read in place and the output has ``y``'s memory format; any other strided ``y`` is
  made contiguous first, and a ``residual`` in another layout is copied into ``y``'s (one copy). A
  channels_last ``y`` runs as ``(N H W, C)`` pixel rows in 2-D tiles of :data:`ROWS_TILE` elements, the
  biases loaded once per tile (the flat kernel's per-element channel index, an integer remainder per
  element, held the decoder's adds at about 1.8 TB/s on an H100). Otherwise the kernel
  is flat over the elements in memory order (``BLOCK`` 1024 fp32 / 2048 fp16-bf16 elements per program,
  128-bit loads where the pointers are aligned); the channel of an element is
  ``(offset // INNER) % C``, ``INNER`` = 1 for channels_last and the spatial size for the contiguous layout.
  When the spatial size is a multiple of ``BLOCK`` a program lies in one channel and loads one bias value;
  otherwise the channel index is computed per element in 32-bit arithmetic from the program's 64-bit base,
  which needs ``C`` and the spatial size below :data:`MAX_INDEX` (about 2**31); above it ``"auto"`` uses the
  reference and ``"triton"`` raises.
* Offsets are 64-bit, so tensors above 2**31 elements are fine. The kernels have no backward: with autograd
  active, ``"auto"`` uses the reference (differentiable) and ``"triton"`` refuses. Triton runs CUDA tensors,
  or CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported; slow,
  used by the tests). Kernel configurations are fixed (no autotuning).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel.triton_kernels import (
    MAX_BLOCK,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _compute_dtype,
    _memory_format,
    _pow2,
    _use_triton,
    _warps,
    launch,
    launch_over_pixels,
    triton,
)

MAX_LN_COLUMNS = 8192
"""Widest row :func:`add_layer_norm_triton` normalises (one row is one register tile)."""
MAX_INDEX = 2**31 - 2 * MAX_BLOCK
"""``C`` and the spatial size :func:`bias_residual_add_triton` takes (32-bit channel arithmetic)."""
ROWS_TILE = 4096
"""Elements per program of the channels_last (pixel rows x channels) bias + residual kernel."""


# -- argument checks ---------------------------------------------------------------------------------------
def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _check_vector(name: str, p: object, channels: int) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor) or not p.is_floating_point() or p.dim() != 1 or p.numel() != channels:
        raise ValueError(
            f"{name} must be None or a 1-D floating-point tensor of {channels} values (C), got {_describe(p)}"
        )


def _check_add_layer_norm(
    y: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    carry_bias: Tensor | None = None,
    input_bias: Tensor | None = None,
    residual_bias: Tensor | None = None,
) -> None:
    """``residual=None``: a plain LayerNorm of ``y`` (then ``carry_bias`` and ``residual_bias`` must be None
    too)."""
    if not isinstance(y, Tensor) or not y.is_floating_point() or y.dim() < 1:
        raise ValueError(f"y must be a floating-point tensor (..., C), got {_describe(y)}")
    if residual is not None:
        _check_residual(y, residual, "")
    elif carry_bias is not None or residual_bias is not None:
        raise ValueError("carry_bias and residual_bias are added to the residual sum: they need a residual")
    channels = y.shape[-1]
    _check_vector("weight", weight, channels)
    _check_vector("bias", bias, channels)
    _check_vector("carry_bias", carry_bias, channels)
    _check_vector("input_bias", input_bias, channels)
    _check_vector("residual_bias", residual_bias, channels)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def _check_bias_residual(
    y: Tensor, bias: Tensor | None, residual: Tensor | None, residual_bias: Tensor | None = None
) -> None:
    if not isinstance(y, Tensor) or not y.is_floating_point() or y.dim() < 2:
        raise ValueError(f"y must be a floating-point tensor (N, C, *spatial), got {_describe(y)}")
    _check_vector("bias", bias, y.shape[1])
    _check_vector("residual_bias", residual_bias, y.shape[1])
    if residual is not None:
        _check_residual(y, residual, "None or ")
    elif residual_bias is not None:
        raise ValueError("residual_bias is added to the residual: it needs a residual")


def _check_residual(y: Tensor, residual: object, alternatives: str) -> None:
    """``residual`` is a tensor of ``y``'s shape, dtype and device (``alternatives``: what else the caller
    accepts, for the message)."""
    if not isinstance(residual, Tensor) or residual.shape != y.shape or residual.dtype != y.dtype:
        raise ValueError(
            f"residual must be {alternatives}a tensor of y's shape {tuple(y.shape)} and dtype "
            f"{str(y.dtype).removeprefix('torch.')}, got {_describe(residual)}"
        )
    if residual.device != y.device:
        raise ValueError(f"residual is on {residual.device} but y is on {y.device}")


def _check_devices(x: Tensor, **params: Tensor | None) -> None:
    for name, p in params.items():
        if p is not None and p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but y is on {x.device}: move it to y's device")


# -- references (float32 maths, one rounding) ----------------------------------------------------------------
def add_layer_norm_reference(
    y: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    carry_bias: Tensor | None = None,
    input_bias: Tensor | None = None,
    residual_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(s, n)``: ``s = y + residual`` computed in float32 (float64 for float64 inputs) and cast to
    ``y.dtype`` once, ``n = F.layer_norm(s)`` over the last dim computed in float32 from the rounded ``s`` and
    cast once; both contiguous. For float32 inputs this is exactly eager ``s = y + residual;
    F.layer_norm(s, (C,), weight, bias, eps)`` (the same torch calls in the same order). ``carry_bias``:
    the returned ``s`` is ``y + residual + carry_bias`` (one rounding); ``n`` is unchanged.
    ``input_bias`` / ``residual_bias``: the sum is ``(y + input_bias) + (residual + residual_bias)``, in
    float32, before the one rounding (``s`` and ``n`` both see them)."""
    _check_add_layer_norm(y, residual, weight, bias, eps, carry_bias, input_bias, residual_bias)
    ct = _compute_dtype(y.dtype)
    yt = y.to(ct) if input_bias is None else y.to(ct) + input_bias.to(ct)
    rt = residual.to(ct) if residual_bias is None else residual.to(ct) + residual_bias.to(ct)
    total = yt + rt
    s = total.to(y.dtype)
    n = _layer_norm_float(s, weight, bias, eps).to(y.dtype)
    if carry_bias is not None:
        s = (total + carry_bias.to(ct)).to(y.dtype)
    return s.contiguous(), n.contiguous()


def layer_norm_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, *, input_bias: Tensor | None = None
) -> Tensor:
    """``F.layer_norm`` over the last dim computed in float32 (float64 for float64 inputs), cast to
    ``x.dtype`` once, contiguous; exactly eager ``F.layer_norm`` for float32. ``input_bias``: the row
    normalised is ``x + input_bias`` computed in float32 and rounded to ``x.dtype`` first."""
    _check_add_layer_norm(x, None, weight, bias, eps, input_bias=input_bias)
    if input_bias is not None:
        ct = _compute_dtype(x.dtype)
        x = (x.to(ct) + input_bias.to(ct)).to(x.dtype)
    return _layer_norm_float(x, weight, bias, eps).to(x.dtype).contiguous()


def _layer_norm_float(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    ct = _compute_dtype(x.dtype)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    return F.layer_norm(x.to(ct), (x.shape[-1],), w, b, eps)


def bias_residual_add_reference(
    y: Tensor, bias: Tensor | None, residual: Tensor | None, *, residual_bias: Tensor | None = None
) -> Tensor:
    """``(y + bias.view(1, C, 1, ...)) + residual`` computed in float32 (float64 for float64 ``y``), cast to
    ``y.dtype`` once, in ``y``'s memory format (channels_last kept, anything else contiguous). For float32
    this is exactly eager ``residual + (y + bias.view(1, C, 1, ...))``. ``residual_bias``: the residual is
    ``residual + residual_bias.view(1, C, 1, ...)`` (the bias of a bias-free skip convolution)."""
    _check_bias_residual(y, bias, residual, residual_bias)
    ct = _compute_dtype(y.dtype)
    shape = (1, -1, *([1] * (y.dim() - 2)))
    out = y.to(ct)
    if bias is not None:
        out = out + bias.to(ct).view(shape)
    if residual is not None:
        r = residual.to(ct)
        out = out + (r if residual_bias is None else r + residual_bias.to(ct).view(shape))
    return out.to(y.dtype).contiguous(memory_format=_memory_format(y))


# -- dispatch ------------------------------------------------------------------------------------------------
def _ln_fits(y: Tensor) -> bool:
    return y.shape[-1] <= MAX_LN_COLUMNS


def _bias_residual_fits(y: Tensor) -> bool:
    return y.shape[1] < MAX_INDEX and math.prod(y.shape[2:]) < MAX_INDEX


def add_layer_norm(
    y: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    carry_bias: Tensor | None = None,
    input_bias: Tensor | None = None,
    residual_bias: Tensor | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused residual add + LayerNorm: ``(s, n)`` with ``s = y + residual`` and ``n = layer_norm(s)`` over
    the last dim (see the module doc); ``backend`` picks Triton or the reference. ``carry_bias`` (C values)
    is added to the returned ``s`` only -- the bias of a layer whose bias-free output is then accumulated
    into ``s`` in place (``s.addmm_(h, W.t())``: the transformer's feed-forward output projection).
    ``input_bias`` / ``residual_bias`` (C values each) are added to ``y`` / ``residual`` before the sum: the
    biases of the bias-free GEMMs that produced them."""
    biases = {"carry_bias": carry_bias, "input_bias": input_bias, "residual_bias": residual_bias}
    _check_add_layer_norm(y, residual, weight, bias, eps, **biases)
    if _use_triton(backend, "add_layer_norm", y, residual, weight, bias, *biases.values()) and (
        backend == "triton" or _ln_fits(y)
    ):
        return add_layer_norm_triton(y, residual, weight, bias, eps, **biases, recorder=recorder)
    return add_layer_norm_reference(y, residual, weight, bias, eps, **biases)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    input_bias: Tensor | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """LayerNorm over the last dim through :func:`add_layer_norm`'s kernel without a residual (one read,
    one write; float32 statistics over the row in registers); ``backend`` picks Triton or the reference.
    ``input_bias``: normalise ``x + input_bias`` (rounded once to ``x.dtype``; ``x`` is not changed)."""
    _check_add_layer_norm(x, None, weight, bias, eps, input_bias=input_bias)
    use = _use_triton(backend, "layer_norm", x, weight, bias, input_bias)
    if use and (backend == "triton" or _ln_fits(x)):
        return _layer_norm_rows(x, None, weight, bias, eps, None, MAX_BLOCK, recorder, input_bias)[1]
    return layer_norm_reference(x, weight, bias, eps, input_bias=input_bias)


def bias_residual_add(
    y: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    *,
    residual_bias: Tensor | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """Fused ``y + bias[c] + residual`` for a convolution output ``y`` ``(N, C, *spatial)`` (see the module
    doc); ``backend`` picks Triton or the reference. ``residual_bias`` (C values) is added to the residual:
    the bias of the skip convolution that produced it without one."""
    _check_bias_residual(y, bias, residual, residual_bias)
    if _use_triton(backend, "bias_residual_add", y, bias, residual, residual_bias) and (
        backend == "triton" or _bias_residual_fits(y)
    ):
        return bias_residual_add_triton(y, bias, residual, residual_bias=residual_bias, recorder=recorder)
    return bias_residual_add_reference(y, bias, residual, residual_bias=residual_bias)


# -- torch-facing kernel calls -----------------------------------------------------------------------------
def add_layer_norm_triton(
    y: Tensor,
    residual: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    carry_bias: Tensor | None = None,
    input_bias: Tensor | None = None,
    residual_bias: Tensor | None = None,
    max_block: int = MAX_BLOCK,
    recorder: KernelRecorder | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`add_layer_norm` through the Triton kernel. ``max_block`` (a power of two) caps the rows x
    columns of a program's tile (smaller values give more, partial, row blocks in tests); a row is always
    one tile, so a program holds at least one row whatever ``max_block`` is."""
    _check_add_layer_norm(y, residual, weight, bias, eps, carry_bias, input_bias, residual_bias)
    return _layer_norm_rows(
        y, residual, weight, bias, eps, carry_bias, max_block, recorder, input_bias, residual_bias
    )


def layer_norm_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    *,
    input_bias: Tensor | None = None,
    max_block: int = MAX_BLOCK,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`layer_norm` through the Triton kernel (``max_block`` as in :func:`add_layer_norm_triton`)."""
    _check_add_layer_norm(x, None, weight, bias, eps, input_bias=input_bias)
    return _layer_norm_rows(x, None, weight, bias, eps, None, max_block, recorder, input_bias)[1]


def _layer_norm_rows(
    y: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    carry_bias: Tensor | None,
    max_block: int,
    recorder: KernelRecorder | None,
    input_bias: Tensor | None = None,
    residual_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The launch behind both kernel calls: ``(s, n)``; without a residual ``s`` is ``y`` (not written)."""
    channels = y.shape[-1]
    what = "add_layer_norm" if residual is not None else "layer_norm"
    if not _ln_fits(y):
        raise ValueError(
            f"the Triton {what} kernel normalises rows of at most {MAX_LN_COLUMNS} values (one "
            f"register tile), got C={channels}; use backend='auto' or 'reference'"
        )
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a power of two, got {max_block}")
    _check_kernel_input(y, what)
    _check_devices(
        y, weight=weight, bias=bias, carry_bias=carry_bias, input_bias=input_bias, residual_bias=residual_bias
    )
    y = y.contiguous()
    if residual is not None:
        residual = residual.contiguous()
        s = torch.empty_like(y, memory_format=torch.contiguous_format)
    else:
        s = y
    n = torch.empty_like(y, memory_format=torch.contiguous_format)
    rows = y.numel() // channels if channels else 0
    if rows == 0:
        return s, n
    block_c = max(16, _pow2(channels))
    block_r = max(1, min(max_block // block_c, _pow2(rows)))
    # absent operands: a dummy pointer (never read)
    w = weight.contiguous() if weight is not None else y
    b = bias.contiguous() if bias is not None else y
    cb = carry_bias.contiguous() if carry_bias is not None else y
    yb = input_bias.contiguous() if input_bias is not None else y
    rb = residual_bias.contiguous() if residual_bias is not None else y
    launch(
        _add_layer_norm_kernel,
        (triton.cdiv(rows, block_r),),
        recorder,
        y,
        residual if residual is not None else y,
        w,
        b,
        cb,
        yb,
        rb,
        s,
        n,
        rows,
        channels,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        HAS_CARRY=carry_bias is not None,
        HAS_YB=input_bias is not None,
        HAS_RB=residual_bias is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_warps(block_r * block_c),
    )
    return s, n


def _same_layout(like: Tensor, t: Tensor) -> Tensor:
    """``t``'s values in ``like``'s strides (a copy unless they already match)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def bias_residual_add_triton(
    y: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    *,
    residual_bias: Tensor | None = None,
    block: int | None = None,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`bias_residual_add` through the Triton kernels: a channels_last ``y`` as pixel rows x channel
    tiles (:data:`ROWS_TILE` elements), any other layout flat in memory order. ``block`` (a power of two
    >= 16) takes the flat kernel whatever the layout, with that many elements per program (default 2048 for
    16-bit dtypes, 1024 for float32; tests use small blocks to exercise both the one-channel-per-program and
    the per-element channel paths)."""
    _check_bias_residual(y, bias, residual, residual_bias)
    if not _bias_residual_fits(y):
        raise ValueError(
            f"the Triton bias_residual_add kernel takes C and a spatial size below {MAX_INDEX} (32-bit "
            f"channel arithmetic), got shape {tuple(y.shape)}; use backend='auto' or 'reference'"
        )
    flat = block is not None  # an explicit block: the flat kernel, whatever the layout (tests)
    if block is None:
        block = MAX_BLOCK if y.element_size() <= 2 else MAX_BLOCK // 2
    if block < 16 or block > MAX_BLOCK or block & (block - 1):
        raise ValueError(f"block must be a power of two in [16, {MAX_BLOCK}], got {block}")
    _check_kernel_input(y, "bias_residual_add")
    _check_devices(y, bias=bias, residual_bias=residual_bias)
    channels_last = _memory_format(y) == torch.channels_last
    if not channels_last and not y.is_contiguous():
        y = y.contiguous()
    out = torch.empty_like(y)  # preserve_format: the same strides as y
    if out.stride() != y.stride():  # pragma: no cover - dense tensors keep their strides
        raise RuntimeError(f"internal error: output strides {out.stride()} differ from y's {y.stride()}")
    if residual is not None:
        residual = _same_layout(y, residual)
    bias = bias.contiguous() if bias is not None else None
    residual_bias = residual_bias.contiguous() if residual_bias is not None else None
    numel = y.numel()
    if numel == 0:
        return out
    channels = y.shape[1]
    spatial = math.prod(y.shape[2:])
    if channels_last and not flat:
        # pixel rows x channel columns: the bias is one vector per tile, no per-element channel index
        launch_over_pixels(
            _bias_residual_add_rows_kernel,
            recorder,
            numel // channels,
            channels,
            ROWS_TILE,
            y,
            bias if bias is not None else y,
            residual if residual is not None else y,
            residual_bias if residual_bias is not None else y,
            out,
            numel // channels,
            channels,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            HAS_RBIAS=residual_bias is not None,
        )
        return out
    inner = 1 if channels_last else spatial
    block = max(16, min(block, _pow2(numel)))
    launch(
        _bias_residual_add_kernel,
        (triton.cdiv(numel, block),),
        recorder,
        y,
        bias if bias is not None else y,  # a dummy pointer when absent
        residual if residual is not None else y,
        residual_bias if residual_bias is not None else y,
        out,
        numel,
        channels,
        inner,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_RBIAS=residual_bias is not None,
        BIAS_PER_BLOCK=inner % block == 0,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return out


# -- kernels -------------------------------------------------------------------------------------------------
if triton is not None:
    from ldm_sdk.kernels.residual_kernels import (
        _add_layer_norm_kernel,
        _bias_residual_add_kernel,
        _bias_residual_add_rows_kernel,
    )


__all__ = [
    "MAX_INDEX",
    "MAX_LN_COLUMNS",
    "add_layer_norm",
    "add_layer_norm_reference",
    "add_layer_norm_triton",
    "bias_residual_add",
    "bias_residual_add_reference",
    "bias_residual_add_triton",
    "layer_norm",
    "layer_norm_reference",
    "layer_norm_triton",
]
