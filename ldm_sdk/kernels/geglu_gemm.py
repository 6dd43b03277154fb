"""The Triton kernels of :mod:`ldm_sdk.accel.geglu_gemm` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _geglu_gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    INNER,
    K,
    stride_xm,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    F32_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y[r, j] = (x[r] . w[j] + b[j]) * gelu(x[r] . w[INNER + j] + b[INNER + j])`` over one
    ``BLOCK_M x BLOCK_N`` tile; ``x`` ``(M, K)`` with row stride ``stride_xm``, ``w`` ``(2 INNER, K)``
    contiguous, ``y`` ``(M, INNER)`` contiguous. Program ``pid`` maps to tile ``(pid_m, pid_n)`` in groups
    of ``GROUP_M`` row tiles walked column-major, so concurrent programs share weight columns in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(INNER, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows / columns past the end wrap onto valid ones: unmasked loads, results not stored
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % INNER).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    wa_ptrs = w_ptr + cols[None, :] * K + offs_k[:, None]  # W[:INNER]^T tile, [BLOCK_K, BLOCK_N]
    wg_ptrs = w_ptr + (cols + INNER)[None, :] * K + offs_k[:, None]  # W[INNER:]^T tile

    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            wa = tl.load(wa_ptrs)
            wg = tl.load(wg_ptrs)
        else:
            k_left = K - kk * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wa = tl.load(wa_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wg = tl.load(wg_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if F32_OPERANDS:  # interpreter only (see the module doc)
            a = a.to(tl.float32)
            wa = wa.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_a = tl.dot(a, wa, acc_a)
        acc_g = tl.dot(a, wg, acc_g)
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K

    if HAS_BIAS:
        acc_a += tl.load(b_ptr + cols).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + INNER + cols).to(tl.float32)[None, :]
    out = acc_a * (0.5 * acc_g * (1.0 + tl.erf(acc_g * 0.7071067811865476)))
    store_rows = offs_m.to(tl.int64)
    valid = (offs_m < M)[:, None] & (offs_n < INNER)[None, :]
    tl.store(
        y_ptr + store_rows[:, None] * INNER + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=valid
    )
