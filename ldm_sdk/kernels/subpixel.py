"""The Triton kernels of :mod:`ldm_sdk.accel.subpixel` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl

from ldm_sdk.kernels.triton_kernels import phase_source_index


@triton.jit
def _store_phase(out_ptr, o, ci, ok, C_IN, k00, k01, k10, k11):
    """Store the 2x2 kernel of output channel ``o``, input channels ``ci`` (layout ``(O, 2, 2, I)``)."""
    base = out_ptr + o.to(tl.int64) * (4 * C_IN) + ci
    ty = out_ptr.dtype.element_ty
    tl.store(base, k00.to(ty), mask=ok)
    tl.store(base + C_IN, k01.to(ty), mask=ok)
    tl.store(base + 2 * C_IN, k10.to(ty), mask=ok)
    tl.store(base + 3 * C_IN, k11.to(ty), mask=ok)


@triton.jit
def _phase_kernels_kernel(w_ptr, out_ptr, C_OUT, C_IN, S_O, S_I, S_Y, S_X, BLOCK: tl.constexpr):
    """Output channel ``co`` = program 0, input channels ``[p BLOCK, (p + 1) BLOCK)``: the four phases'
    2x2 kernels of :func:`phase_kernels`. Rows first (``r0 = W0``, ``r1 = W1 + W2`` for phase row 0;
    ``r0 = W0 + W1``, ``r1 = W2`` for 1), then columns alike, in float32, as the torch form sums them."""
    co = tl.program_id(0)
    ci = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = ci < C_IN
    base = w_ptr + co.to(tl.int64) * S_O + ci * S_I
    w00 = tl.load(base, mask=ok).to(tl.float32)
    w01 = tl.load(base + S_X, mask=ok).to(tl.float32)
    w02 = tl.load(base + 2 * S_X, mask=ok).to(tl.float32)
    w10 = tl.load(base + S_Y, mask=ok).to(tl.float32)
    w11 = tl.load(base + S_Y + S_X, mask=ok).to(tl.float32)
    w12 = tl.load(base + S_Y + 2 * S_X, mask=ok).to(tl.float32)
    w20 = tl.load(base + 2 * S_Y, mask=ok).to(tl.float32)
    w21 = tl.load(base + 2 * S_Y + S_X, mask=ok).to(tl.float32)
    w22 = tl.load(base + 2 * S_Y + 2 * S_X, mask=ok).to(tl.float32)
    # row sums per column j: phase row a = 0 -> (r0, r1) = (W0, W1 + W2); a = 1 -> (W0 + W1, W2)
    a0r1c0, a0r1c1, a0r1c2 = w10 + w20, w11 + w21, w12 + w22
    a1r0c0, a1r0c1, a1r0c2 = w00 + w10, w01 + w11, w02 + w12
    # phase (a, b) = (0, 0): columns (c0, c1 + c2)
    _store_phase(out_ptr, co, ci, ok, C_IN, w00, w01 + w02, a0r1c0, a0r1c1 + a0r1c2)
    # (0, 1): columns (c0 + c1, c2)
    _store_phase(out_ptr, C_OUT + co, ci, ok, C_IN, w00 + w01, w02, a0r1c0 + a0r1c1, a0r1c2)
    # (1, 0)
    _store_phase(out_ptr, 2 * C_OUT + co, ci, ok, C_IN, a1r0c0, a1r0c1 + a1r0c2, w20, w21 + w22)
    # (1, 1)
    _store_phase(out_ptr, 3 * C_OUT + co, ci, ok, C_IN, a1r0c0 + a1r0c1, a1r0c2, w20 + w21, w22)


@triton.jit(do_not_specialize=["P"])
def _interleave_phases_kernel(
    src_ptr,
    bias_ptr,
    out_ptr,
    P,
    H,
    W,
    C,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Output pixels ``[p BLOCK_P, (p + 1) BLOCK_P)`` of the channels_last ``(N, 2H, 2W, C)`` map,
    channels ``[q BLOCK_C, (q + 1) BLOCK_C)``: pixel ``(n, 2i + a, 2j + b)`` copies channels
    ``(2a + b) C + c`` of source pixel ``(n, i + a, j + b)`` of ``(N, H + 1, W + 1, 4C)``, plus
    ``bias[c]`` with ``HAS_BIAS`` (in float32, rounded once)."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (pix < P)[:, None] & (cols < C)[None, :]
    per_sample = 4 * H * W
    src = phase_source_index(pix // per_sample, pix % per_sample, cols, H, W, C)
    v = tl.load(src_ptr + src, mask=valid)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) + b[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + pix[:, None] * C + cols[None, :], v, mask=valid)
