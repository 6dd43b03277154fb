"""The Triton kernels of :mod:`ldm_sdk.accel.short_attention` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "TILES"])
def _short_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    N,
    M,
    H,
    TILES,
    SQ_B,
    SQ_N,
    SK_B,
    SK_M,
    SV_B,
    SV_M,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_K2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Query tiles ``[p TILES, (p + 1) TILES)`` (``BLOCK_M`` queries each) of (sample, head) = program 1
    against all ``M`` keys, loaded once as a ``BLOCK_K`` block and (``BLOCK_K2`` > 0) a second one
    (77 keys: 64 + 16, not one padded block of 128): per tile ``S = q k^T scale`` (float32),
    ``P = exp(S - max)`` over both blocks, ``out = (P v) / sum P``."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    feat = h * HEAD_DIM + d
    k_base = k_ptr + b * SK_B + feat[None, :]
    v_base = v_ptr + b * SV_B + feat[None, :]
    keys = tl.arange(0, BLOCK_K)
    kt, v = _key_block(k_base, v_base, keys, M, SK_M, SV_M, d_ok)
    if BLOCK_K2 > 0:  # the keys past the first power of two: a second, narrower block
        keys2 = BLOCK_K + tl.arange(0, BLOCK_K2)
        kt2, v2 = _key_block(k_base, v_base, keys2, M, SK_M, SV_M, d_ok)
    inner = H * HEAD_DIM
    q_base = q_ptr + b * SQ_B + feat[None, :]
    o_base = o_ptr + b * N * inner + feat[None, :]
    first = tl.program_id(0) * TILES
    for i in range(TILES):
        rows = (first + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        io_mask = (rows < N)[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None].to(tl.int64) * SQ_N, mask=io_mask, other=0.0)
        s = tl.where((keys < M)[None, :], tl.dot(q, kt) * scale, float("-inf"))
        top = tl.max(s, axis=1)
        if BLOCK_K2 > 0:
            s2 = tl.where((keys2 < M)[None, :], tl.dot(q, kt2) * scale, float("-inf"))
            top = tl.maximum(top, tl.max(s2, axis=1))
        p = tl.exp(s - top[:, None])
        total = tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v)
        if BLOCK_K2 > 0:
            p2 = tl.exp(s2 - top[:, None])
            total += tl.sum(p2, axis=1)
            acc = tl.dot(p2.to(v2.dtype), v2, acc)
        out = (acc / total[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_base + rows[:, None].to(tl.int64) * inner, out, mask=io_mask)


@triton.jit
def _key_block(k_base, v_base, keys, M, SK_M, SV_M, d_ok):
    """``(k^T, v)`` of ``keys`` (zero past ``M`` and past the head dim)."""
    mask = (keys < M)[:, None] & d_ok[None, :]
    k = tl.load(k_base + keys[:, None] * SK_M, mask=mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * SV_M, mask=mask, other=0.0)
    return tl.trans(k), v
