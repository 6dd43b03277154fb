"""The Triton kernels of :mod:`ldm_sdk.accel.skip_concat` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["P", "PB"])
def _concat_kernel(a_ptr, b_ptr, out_ptr, P, PB, CA, CB, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output pixels ``[p BLOCK_P, (p + 1) BLOCK_P)``, channels ``[q BLOCK_C, (q + 1) BLOCK_C)`` of
    the channels_last ``(P, CA + CB)`` rows: channel ``c`` is ``a``'s below ``CA``, else ``b``'s
    ``c - CA``. ``b`` has ``PB`` pixel rows, ``P`` a multiple of them: output row ``p`` takes ``b``'s
    row ``p mod PB`` (``b``'s batch repeated)."""
    pix = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows_ok = (pix < P)[:, None]
    in_a = (cols < CA)[None, :]
    in_b = ((cols >= CA) & (cols < CA + CB))[None, :]
    va = tl.load(a_ptr + pix[:, None] * CA + cols[None, :], mask=rows_ok & in_a)
    vb = tl.load(b_ptr + (pix % PB)[:, None] * CB + (cols - CA)[None, :], mask=rows_ok & in_b)
    tl.store(
        out_ptr + pix[:, None] * (CA + CB) + cols[None, :],
        tl.where(in_a, va, vb),
        mask=rows_ok & (in_a | in_b),
    )
