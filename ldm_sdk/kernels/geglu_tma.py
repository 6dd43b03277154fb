"""The Triton kernels of :mod:`ldm_sdk.accel.geglu_tma` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _geglu_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    b_ptr,
    M,
    INNER,
    K,
    PROGRAMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program ``p`` computes output tiles ``p, p + PROGRAMS, ...`` (grouped order: ``GROUP_M`` row
    tiles per column tile, so programs working at once share weight tiles in L2). Per tile: the value
    half ``x @ w[n : n + BN]^T`` and the gate half ``x @ w[INNER + n : ...]^T`` from one load of each
    ``x`` tile, then bias, gating and one TMA store. Rows / columns past the end: zero-filled loads
    (the value tile of a last partial column block reads gate rows; those columns are not stored),
    clipped stores."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(INNER, BLOCK_N)
    per_group = GROUP_M * tiles_n
    k_steps = tl.cdiv(K, BLOCK_K)
    tiles = tiles_m * tiles_n
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, num_stages=STAGES):
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        row0 = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        col0 = ((tile % per_group) // group_rows) * BLOCK_N
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_steps):
            k0 = kk * BLOCK_K
            a = x_desc.load([row0, k0])
            acc_a = tl.dot(a, w_desc.load([col0, k0]).T, acc_a)
            acc_g = tl.dot(a, w_desc.load([INNER + col0, k0]).T, acc_g)
        if HAS_BIAS:
            cols = col0 + tl.arange(0, BLOCK_N)
            in_range = cols < INNER
            acc_a += tl.load(b_ptr + cols, mask=in_range, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + INNER + cols, mask=in_range, other=0.0).to(tl.float32)[None, :]
        out = acc_a * (0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)))
        y_desc.store([row0, col0], out.to(tl.bfloat16 if BF16 else tl.float16))
