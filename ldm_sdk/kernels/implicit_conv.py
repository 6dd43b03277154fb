"""The Triton kernels of :mod:`ldm_sdk.accel.implicit_conv` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "H", "W", "PROGRAMS"])
def _conv3x3_fused_kernel(
    x_desc,
    w_desc,
    y_desc,
    r_desc,
    bias_ptr,
    rbias_ptr,
    mean_ptr,
    m2_ptr,
    count_ptr,
    N,
    H,
    W,
    C,
    CO,
    PROGRAMS,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    STATS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """A 3x3 convolution (stride 1, zero padding 1) of a channels_last map with the epilogue of the block
    that follows it. Output tiles are ``BLOCK_W`` consecutive pixels of one image row times ``BLOCK_N``
    output channels (column tiles fastest, so programs running together share their input tile in L2);
    program ``p`` computes tiles ``p, p + PROGRAMS, ...`` (with ``FLATTEN`` the tile loop is flattened
    into the K loop: the next tile's first loads are issued during this tile's epilogue).

    Per tile, one loop of ``9 C / BLOCK_K`` steps: the input tile is one 4-D TMA copy of the map shifted
    by the tap (pixels outside the map arrive as zeros: the zero padding), the weight tile one 2-D TMA copy
    of the ``(CO, 9 C)`` tap-major weight matrix (the channels_last weight's own memory order).
    Epilogue, in float32 on the accumulators: ``(acc + bias[c]) + (residual + rbias[c])`` (terms by the
    flags, the residual tile one TMA copy), rounded once and written by a TMA store clipped at the map's
    edge. With ``STATS`` each column of the tile's rounded values also gives one partial -- its count,
    mean and sum of squared deviations from that mean -- at ``(n T + t) CO + c``, ``t`` the tile's index
    among the ``T = H ceil(W / BLOCK_W)`` of its sample (merged per group by
    :func:`_merge_partials_kernel`)."""
    tiles_n = tl.cdiv(CO, BLOCK_N)
    tiles_w = tl.cdiv(W, BLOCK_W)
    per_sample = H * tiles_w
    tiles = N * per_sample * tiles_n
    c_steps = C // BLOCK_K
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, num_stages=STAGES):
        col = tile % tiles_n
        row_tile = tile // tiles_n
        t = row_tile % per_sample
        n = row_tile // per_sample
        y0 = t // tiles_w
        x0 = (t % tiles_w) * BLOCK_W
        co0 = col * BLOCK_N
        acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        for kk in range(9 * c_steps):
            tap = kk // c_steps
            c0 = (kk - tap * c_steps) * BLOCK_K
            a = x_desc.load([n, y0 + tap // 3 - 1, x0 + tap % 3 - 1, c0]).reshape(BLOCK_W, BLOCK_K)
            acc = tl.dot(a, w_desc.load([co0, tap * C + c0]).T, acc)
        cols = co0 + tl.arange(0, BLOCK_N)
        col_ok = cols < CO
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            r = r_desc.load([n, y0, x0, co0]).reshape(BLOCK_W, BLOCK_N).to(tl.float32)
            if HAS_RBIAS:
                r = r + tl.load(rbias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc = acc + r
        rounded = acc.to(tl.bfloat16 if BF16 else tl.float16)
        y_desc.store([n, y0, x0, co0], rounded.reshape(1, 1, BLOCK_W, BLOCK_N))
        if STATS:
            _column_partials(
                rounded, x0, W, (n * per_sample + t) * CO + cols, col_ok, mean_ptr, m2_ptr, count_ptr, BLOCK_W
            )


@triton.jit
def _column_partials(rounded, x0, W, at, col_ok, mean_ptr, m2_ptr, count_ptr, BLOCK_W: tl.constexpr):
    """Per column of a tile of rounded outputs (pixels ``x0 + [0, BLOCK_W)`` of a row ``W`` wide; those
    past its end left out): count, mean and sum of squared deviations from that mean, stored at ``at``."""
    row_ok = (x0 + tl.arange(0, BLOCK_W)) < W
    vals = tl.where(row_ok[:, None], rounded.to(tl.float32), 0.0)
    rows = tl.minimum(W - x0, BLOCK_W).to(tl.float32)
    col_mean = tl.sum(vals, axis=0) / rows
    d = tl.where(row_ok[:, None], vals - col_mean[None, :], 0.0)
    tl.store(mean_ptr + at, col_mean, mask=col_ok)
    tl.store(m2_ptr + at, tl.sum(d * d, axis=0), mask=col_ok)
    tl.store(count_ptr + at, tl.zeros_like(col_mean) + rows, mask=col_ok)


@triton.jit(do_not_specialize=["N", "H", "W"])
def _subpixel_conv_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    mean_ptr,
    m2_ptr,
    count_ptr,
    N,
    H,
    W,
    C,
    CO,
    HAS_BIAS: tl.constexpr,
    STATS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Nearest 2x upsampling + 3x3 convolution in the sub-pixel form (:mod:`ldm_sdk.accel.subpixel`), written
    straight into the big channels_last map. Program ``p``: phase ``(a, b)``, ``BLOCK_N`` output channels,
    pixels ``j0 + [0, BLOCK_W)`` of input row ``i`` of sample ``n`` (phases and column tiles fastest, so
    programs running together share their input tiles in L2). Output pixel ``(2i + a, 2j + b)`` is
    ``sum over (u, v) in 2 x 2, c: x[n, i + a + u - 1, j + b + v - 1, c] w[(2a + b) CO + co, (2u + v) C + c]``
    for the phase-major ``(4 CO, 4 C)`` tap-major kernel matrix: one loop of ``4 C / BLOCK_K`` steps, each
    input tile one 4-D TMA copy of the small map shifted by the tap (zeros outside: the padding). Epilogue:
    ``+ bias[co]`` in float32, one rounding, one TMA store through the ``(N H, 2, W, 2, CO)`` view of the
    big map (the phase's pixels of output row ``2i + a`` at stride 2); with ``STATS`` per-column partials
    as :func:`_conv3x3_fused_kernel`'s, tile index ``t = 4 (i ceil(W / BLOCK_W) + tx) + 2a + b``."""
    tiles_n = tl.cdiv(CO, BLOCK_N)
    tiles_w = tl.cdiv(W, BLOCK_W)
    pid = tl.program_id(0)
    col = pid % tiles_n
    phase = (pid // tiles_n) % 4
    row_tile = pid // (4 * tiles_n)
    t = row_tile % (H * tiles_w)
    n = row_tile // (H * tiles_w)
    i = t // tiles_w
    j0 = (t % tiles_w) * BLOCK_W
    pa = phase // 2
    pb = phase % 2
    co0 = col * BLOCK_N
    c_steps = C // BLOCK_K
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, 4 * c_steps, num_stages=STAGES):
        tap = kk // c_steps
        c0 = (kk - tap * c_steps) * BLOCK_K
        a = x_desc.load([n, i + pa + tap // 2 - 1, j0 + pb + tap % 2 - 1, c0]).reshape(BLOCK_W, BLOCK_K)
        acc = tl.dot(a, w_desc.load([phase * CO + co0, tap * C + c0]).T, acc)
    cols = co0 + tl.arange(0, BLOCK_N)
    col_ok = cols < CO
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rounded = acc.to(tl.bfloat16 if BF16 else tl.float16)
    y_desc.store([n * H + i, pa, j0, pb, co0], rounded.reshape(1, 1, BLOCK_W, 1, BLOCK_N))
    if STATS:
        at = (n * (4 * H * tiles_w) + 4 * t + phase) * CO + cols
        _column_partials(rounded, j0, W, at, col_ok, mean_ptr, m2_ptr, count_ptr, BLOCK_W)


@triton.jit(do_not_specialize=["T", "CO", "SLOTS"])
def _merge_partials_kernel(
    mean_ptr,
    m2_ptr,
    count_ptr,
    out_mean_ptr,
    out_m2_ptr,
    out_count_ptr,
    T,
    CO,
    SLOTS,
    CG: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
):
    """Program ``q = n G + g`` merges the per-column partials (count, mean, M2 at ``(n T + t) CO + c``)
    of group ``g``'s ``CG`` columns over the ``T`` tiles of sample ``n`` by the parallel (Chan) formula --
    the total count and mean first, then ``M2 = sum M2_i + sum n_i (mean_i - mean)^2`` -- and writes the
    result into slot 0 of its ``SLOTS`` output slots, the others empty (count 0): the layout of a
    GroupNorm launch plan's partials, which its apply pass merges the same way."""
    q = tl.program_id(0).to(tl.int64)
    groups = CO // CG
    n = q // groups
    g = q % groups
    ts = tl.arange(0, BLOCK_T)
    cs = g * CG + tl.arange(0, CG)
    total = tl.zeros([BLOCK_T, CG], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_T, CG], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        ok = (start + ts < T)[:, None]
        at = (n * T + start + ts)[:, None] * CO + cs[None, :]
        cnt = tl.load(count_ptr + at, mask=ok, other=0.0)
        total += cnt
        weighted += cnt * tl.load(mean_ptr + at, mask=ok, other=0.0)
    count = tl.sum(tl.sum(total, axis=1), axis=0)
    mean = tl.sum(tl.sum(weighted, axis=1), axis=0) / tl.maximum(count, 1.0)
    spread = tl.zeros([BLOCK_T, CG], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        ok = (start + ts < T)[:, None]
        at = (n * T + start + ts)[:, None] * CO + cs[None, :]
        cnt = tl.load(count_ptr + at, mask=ok, other=0.0)
        d = tl.where(cnt > 0, tl.load(mean_ptr + at, mask=ok, other=0.0) - mean, 0.0)
        spread += tl.load(m2_ptr + at, mask=ok, other=0.0) + cnt * d * d
    m2 = tl.sum(tl.sum(spread, axis=1), axis=0)
    slots = tl.arange(0, BLOCK_SLOTS)
    first = slots == 0
    out = q * SLOTS + slots
    ok_slots = slots < SLOTS
    tl.store(out_mean_ptr + out, tl.where(first, mean, 0.0), mask=ok_slots)
    tl.store(out_m2_ptr + out, tl.where(first, m2, 0.0), mask=ok_slots)
    tl.store(out_count_ptr + out, tl.where(first, count, 0.0), mask=ok_slots)
