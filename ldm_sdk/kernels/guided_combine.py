"""The Triton kernels of :mod:`ldm_sdk.accel.guided_combine` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["B", "PER_SAMPLE", "LAST"])
def _guided_prediction_kernel(
    out_ptr,
    x_ptr,
    ts_ptr,
    res_ptr,
    ab_ptr,
    sqrt_ab_ptr,
    sqrt_1m_ptr,
    log_sigma_ptr,
    B,
    PER_SAMPLE,
    LAST,
    PARAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(i, b)``: elements ``[i BLOCK, (i + 1) BLOCK)`` of sample ``b``."""
    b = tl.program_id(1)
    t = tl.load(ts_ptr + b)  # float64
    scale = tl.load(ts_ptr + B + b).to(tl.float32)
    # the schedule look-up (ScheduleTables.signal_noise_scales), float64
    low_f = tl.floor(t)
    low = tl.minimum(tl.maximum(low_f.to(tl.int64), 0), LAST)
    high = tl.minimum(low + 1, LAST)
    w = t - low.to(tl.float64)
    log_sigma = (1.0 - w) * tl.load(log_sigma_ptr + low) + w * tl.load(log_sigma_ptr + high)
    sigma = tl.exp(log_sigma)
    ab = 1.0 / (1.0 + sigma * sigma)
    integral = t == low_f  # an integer t: its own table entry (low == t when t lies in the table)
    sqrt_ab = tl.where(integral, tl.load(sqrt_ab_ptr + low), tl.sqrt(ab))  # float64: sqrt.rn, IEEE
    sqrt_1m = tl.where(integral, tl.load(sqrt_1m_ptr + low), tl.sqrt(1.0 - ab))

    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PER_SAMPLE
    row = b.to(tl.int64) * PER_SAMPLE
    u = tl.load(out_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(out_ptr + B.to(tl.int64) * PER_SAMPLE + row + offs, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + row + offs, mask=mask, other=0.0)
    # torch.lerp's two-sided formula (the weight's small side keeps the endpoint exact), each side one
    # fused multiply-add as its CUDA kernel computes it
    diff = c - u
    g = tl.where(tl.abs(scale) < 0.5, tl.fma(scale, diff, u), tl.fma(-diff, 1.0 - scale, c))
    if PARAM == 2:  # v
        sa = sqrt_ab.to(tl.float32)
        s1 = sqrt_1m.to(tl.float32)
        eps = sa * g + s1 * xv
        x0 = sa * xv - s1 * g
    else:
        c1 = (1.0 / sqrt_ab).to(tl.float32)
        c2 = (sqrt_1m / sqrt_ab).to(tl.float32)
        if PARAM == 0:  # eps
            eps = g
            x0 = c1 * xv - c2 * g
        else:  # x0
            eps = tl.math.div_rn(c1 * xv - g, c2)
            x0 = g
    tl.store(res_ptr + row + offs, eps, mask=mask)
    tl.store(res_ptr + B.to(tl.int64) * PER_SAMPLE + row + offs, x0, mask=mask)
