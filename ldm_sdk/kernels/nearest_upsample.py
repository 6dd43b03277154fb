"""The Triton kernels of :mod:`ldm_sdk.accel.nearest_upsample` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P"])
def _nearest2x_nhwc_kernel(x_ptr, y_ptr, P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input pixels ``[p BLOCK_P, (p + 1) BLOCK_P)`` (``n H W + i W + j``, rows of ``C`` channels),
    channels ``[q BLOCK_C, (q + 1) BLOCK_C)``: loaded once, stored at the four output pixels
    ``(n, 2i + a, 2j + b)``."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (pix < P)[:, None] & (cols < C)[None, :]
    v = tl.load(x_ptr + pix[:, None] * C + cols[None, :], mask=valid)
    j = pix % W
    i = (pix // W) % H
    n = pix // (W * H)
    out = ((n * 2 * H + 2 * i) * (2 * W) + 2 * j)[:, None] * C + cols[None, :]  # pixel (2i, 2j)
    row = 2 * W * C  # the next output row
    tl.store(y_ptr + out, v, mask=valid)
    tl.store(y_ptr + out + C, v, mask=valid)
    tl.store(y_ptr + out + row, v, mask=valid)
    tl.store(y_ptr + out + row + C, v, mask=valid)
