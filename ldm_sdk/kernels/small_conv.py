"""The Triton kernels of :mod:`ldm_sdk.accel.small_conv` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P"])
def _im2col3x3_kernel(x_ptr, cols_ptr, P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output rows (pixels ``n H W + y W + x``) ``[p BLOCK_P, (p + 1) BLOCK_P)``, tap ``t = 3 dy + dx`` =
    program 1, channels ``[q BLOCK_C, (q + 1) BLOCK_C)``: ``cols[row, t C + c]`` = input pixel
    ``(n, y + dy - 1, x + dx - 1)``'s channel ``c``, 0 outside the map."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    tap = tl.program_id(1)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    dy = tap // 3 - 1
    dx = tap % 3 - 1
    xs = pix % W + dx
    ys = (pix // W) % H + dy
    rows_ok = pix < P
    inside = rows_ok & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    ch_ok = (ch < C)[None, :]
    src = pix + dy * W + dx  # the same sample: a shift of the pixel index
    v = tl.load(x_ptr + src[:, None] * C + ch[None, :], mask=inside[:, None] & ch_ok, other=0.0)
    dst = (pix * 9)[:, None] * C + (tap * C + ch)[None, :]
    tl.store(cols_ptr + dst, v, mask=rows_ok[:, None] & ch_ok)
