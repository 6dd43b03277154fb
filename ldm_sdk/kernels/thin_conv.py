"""The Triton kernels of :mod:`ldm_sdk.accel.thin_conv` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P"])
def _tap_sum_kernel(
    t_ptr,
    bias_ptr,
    out_ptr,
    P,
    H,
    W,
    C,
    WIDTH,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Output pixels ``[p BLOCK_P, (p + 1) BLOCK_P)`` (``n H W + y W + x``) of the channels_last
    ``(N, H, W, C)`` output, channels ``[q BLOCK_C, (q + 1) BLOCK_C)``: the float32 sum of
    ``T[src, (3 dy + dx) C + c]`` over the nine taps whose source pixel ``(n, y + dy - 1, x + dx - 1)``
    lies in the map (``src = pix + (dy - 1) W + dx - 1``), plus the bias, rounded once."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = pix < P
    col_ok = cols < C
    px = pix % W
    py = (pix // W) % H
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for dy in tl.static_range(3):
        sy = py + (dy - 1)
        row_ok = in_range & (sy >= 0) & (sy < H)
        for dx in tl.static_range(3):
            sx = px + (dx - 1)
            ok = row_ok & (sx >= 0) & (sx < W)
            src = pix + ((dy - 1) * W + (dx - 1))  # int64: T holds pixels x WIDTH > 2**31 elements
            offs = src[:, None] * WIDTH + ((3 * dy + dx) * C + cols)[None, :]
            acc += tl.load(t_ptr + offs, mask=ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dst = pix[:, None] * C + cols[None, :]
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & col_ok[None, :])
