"""The Triton kernels of :mod:`ldm_sdk.accel.row_softmax` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit
def _softmax_rows_kernel(x_ptr, COLS, BLOCK: tl.constexpr):
    """Row ``p``: ``x[p] = softmax(x[p])`` in float32, rounded once, written over the input."""
    row = x_ptr + tl.program_id(0).to(tl.int64) * COLS
    cols = tl.arange(0, BLOCK)
    valid = cols < COLS
    x = tl.load(row + cols, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    e = tl.where(valid, e, 0.0)
    y = e * (1.0 / tl.sum(e, axis=0))
    tl.store(row + cols, y.to(x_ptr.dtype.element_ty), mask=valid)
