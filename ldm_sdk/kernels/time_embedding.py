"""The Triton kernel of :mod:`ldm_sdk.accel.time_embedding` (which launches it; see its doc for what it
computes). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit(do_not_specialize=["B", "HALF", "DIM"])
def _timestep_features_kernel(
    t_ptr, out_ptr, B, HALF, DIM, neg_log_period, inv_half, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr
):
    """Row ``r`` of the ``(N, DIM)`` sinusoidal features of ``t[r mod B]``: ``cos`` of the ``HALF``
    frequencies, then ``sin``, then a zero column when ``DIM`` is odd; each value the IEEE float32
    operations of :func:`~ldm_sdk.models.embeddings.timestep_embedding` on CUDA in their order (the
    frequency ``(neg_log_period * i) * inv_half`` -- torch divides by a scalar as a multiplication by its
    reciprocal -- then ``exp``, the product with ``t`` as float32, ``cos`` / ``sin``: libdevice's
    functions, which torch's CUDA kernels call too), rounded once to ``out``'s dtype by the store.
    ``LIBDEVICE`` off (the Triton interpreter, which has no libdevice): ``tl.exp`` / ``tl.cos`` / ``tl.sin``
    instead."""
    r = tl.program_id(0)
    t = tl.load(t_ptr + r % B).to(tl.float32)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    scaled = (neg_log_period * i.to(tl.float32)) * inv_half
    row = out_ptr + r.to(tl.int64) * DIM
    if LIBDEVICE:
        arg = t * libdevice.exp(scaled)
        cos = libdevice.cos(arg)
        sin = libdevice.sin(arg)
    else:
        arg = t * tl.exp(scaled)
        cos = tl.cos(arg)
        sin = tl.sin(arg)
    tl.store(row + i, cos, mask=ok)
    tl.store(row + HALF + i, sin, mask=ok)
    tl.store(row + 2 * HALF + i, tl.zeros_like(arg), mask=i < DIM - 2 * HALF)
