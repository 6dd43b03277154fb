"""The Triton kernels of :mod:`ldm_sdk.accel.residual_kernels` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl

from ldm_sdk.kernels.triton_kernels import add_bias_residual


@triton.jit(do_not_specialize=["ROWS"])
def _add_layer_norm_kernel(
    y_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    cb_ptr,
    yb_ptr,
    rb_ptr,
    s_ptr,
    n_ptr,
    ROWS,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    HAS_YB: tl.constexpr,
    HAS_RB: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows ``[p BLOCK_R, (p + 1) BLOCK_R)``. With ``HAS_RESIDUAL``: ``s = y + r`` rounded to the output
    dtype and stored (``HAS_CARRY``: ``y + r + cb[c]`` is stored instead, rounded once, while the norm
    still reads the rounded ``y + r``); then the LayerNorm of the rounded row (mean, then the variance
    of the centred row), stored. Without a residual the row normalised is ``y`` itself and no ``s`` is
    written. ``HAS_YB`` / ``HAS_RB``: ``yb[c]`` / ``rb[c]`` are added to ``y`` / ``r`` in float32 first
    (without a residual, ``y + yb`` is rounded to the output dtype before it is normalised)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    valid = (rows < ROWS)[:, None] & col_ok[None, :]
    idx = rows[:, None] * C + cols[None, :]
    y = tl.load(y_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_YB:
        y = y + tl.load(yb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_RB:
            r = r + tl.load(rb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        total = y + r
        s = total.to(s_ptr.dtype.element_ty)
        if HAS_CARRY:
            carried = total + tl.load(cb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(s_ptr + idx, carried.to(s_ptr.dtype.element_ty), mask=valid)
        else:
            tl.store(s_ptr + idx, s, mask=valid)
        x = s.to(tl.float32)  # the rounded residual stream; padding lanes are 0
    elif HAS_YB:
        x = y.to(n_ptr.dtype.element_ty).to(tl.float32)  # as a biased GEMM would have stored it
    else:
        x = y
    mean = tl.sum(x, axis=1) / C
    d = tl.where(valid, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    out = d * rstd[:, None]
    if HAS_W:
        out = out * tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_B:
        out = out + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(n_ptr + idx, out.to(n_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["NUMEL"])
def _bias_residual_add_kernel(
    y_ptr,
    b_ptr,
    r_ptr,
    rb_ptr,
    out_ptr,
    NUMEL,
    C,
    INNER,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    BIAS_PER_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Elements ``[p BLOCK, (p + 1) BLOCK)`` in memory order: ``out = (y + bias[c]) + r`` in float32
    (``HAS_RBIAS``: ``(y + bias[c]) + (r + rb[c])``), rounded once; ``c = (offset // INNER) % C``.
    ``BIAS_PER_BLOCK`` (``INNER`` a multiple of ``BLOCK``): the block lies in one channel (one address).
    Otherwise the channel is computed per element in int32 from the block's 64-bit base
    (``base = q INNER + r0``; ``c = (q % C + (r0 + i) // INNER) % C``)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    lane = tl.arange(0, BLOCK)
    offs = base + lane
    valid = offs < NUMEL
    v = tl.load(y_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    bias = v  # placeholders where a flag is off (never read)
    rbias = v
    if HAS_BIAS or HAS_RBIAS:
        c = _channels(base, lane, C, INNER, BIAS_PER_BLOCK)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=valid, other=0.0).to(tl.float32)
    if HAS_RBIAS:
        rbias = tl.load(rb_ptr + c, mask=valid, other=0.0).to(tl.float32)
    v = add_bias_residual(v, r_ptr, offs, valid, bias, rbias, HAS_BIAS, HAS_RESIDUAL, HAS_RBIAS)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["ROWS"])
def _bias_residual_add_rows_kernel(
    y_ptr,
    b_ptr,
    r_ptr,
    rb_ptr,
    out_ptr,
    ROWS,
    C,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """channels_last ``(N H W, C)`` pixel rows: tile (p, q) is rows ``[p BLOCK_P, (p + 1) BLOCK_P)`` x
    channels ``[q BLOCK_C, (q + 1) BLOCK_C)``; the same sum as :func:`_bias_residual_add_kernel`, with
    each bias loaded once per tile as a column vector."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    valid = (rows < ROWS)[:, None] & col_ok[None, :]
    idx = rows[:, None] * C + cols[None, :]
    v = tl.load(y_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    rbias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RBIAS:
        rbias = tl.load(rb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    v = add_bias_residual(
        v, r_ptr, idx, valid, bias[None, :], rbias[None, :], HAS_BIAS, HAS_RESIDUAL, HAS_RBIAS
    )
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _channels(base, lane, C, INNER, BIAS_PER_BLOCK: tl.constexpr):
    """The channel of each of the block's elements (int32): with ``BIAS_PER_BLOCK`` the block's one
    channel for every lane (no per-element division; the loads of it are one address), else computed
    per element from the block's 64-bit base (see :func:`_bias_residual_add_kernel`)."""
    if BIAS_PER_BLOCK:
        c = ((base // INNER) % C).to(tl.int32) + lane * 0
    else:
        q = base // INNER
        c0 = (q % C).to(tl.int32)
        r0 = (base - q * INNER).to(tl.int32)
        c = (c0 + (r0 + lane) // INNER) % C
    return c
