"""The Triton kernels of :mod:`ldm_sdk.accel.triton_kernels` (which launches them; see its doc for what they
compute). Kernel modules import Triton and nothing of torch, so compile workers
(:mod:`ldm_sdk.kernels.compile_workers`) load them in a fraction of a second."""

import triton
import triton.language as tl


@triton.jit
def _welford_update(x, valid, count, mean, m2, step):
    """Element ``step`` (0-based) of each lane into the lanes' running (count, mean, M2); invalid lanes
    unchanged. A lane's positions only grow, so a lane valid at ``step`` was valid at every earlier
    step: its count is ``step + 1``, and one scalar reciprocal serves every lane (no divide per element).
    """
    count_new = count + valid.to(tl.float32)
    delta = x - mean
    inv = 1.0 / (step + 1.0)  # int + float: float32
    mean_new = mean + tl.where(valid, delta * inv, 0.0)
    m2_new = m2 + tl.where(valid, delta * (x - mean_new), 0.0)
    return count_new, mean_new, m2_new


@triton.jit
def _welford_finish(count, mean, m2):
    """(mean, M2) of the union of the lanes' states (1-D), by the parallel (Chan) formula."""
    n = tl.sum(count, axis=0)
    mu = tl.sum(count * mean, axis=0) / tl.maximum(n, 1.0)
    d = tl.where(count > 0, mean - mu, 0.0)
    return mu, tl.sum(m2, axis=0) + tl.sum(count * d * d, axis=0)


@triton.jit
def _merged_stats(
    mean_ptr, m2_ptr, group, units, chunk_units, unit_size, split, eps, BLOCK_SPLIT: tl.constexpr
):
    """(mean, 1 / sqrt(var + eps)) of ``group`` from its ``split`` chunk partials."""
    k = tl.arange(0, BLOCK_SPLIT)
    valid = k < split
    base = group * split
    means = tl.load(mean_ptr + base + k, mask=valid, other=0.0)
    m2s = tl.load(m2_ptr + base + k, mask=valid, other=0.0)
    chunk_len = tl.minimum(tl.maximum(units - k.to(tl.int64) * chunk_units, 0), chunk_units)
    counts = tl.where(valid, (chunk_len * unit_size).to(tl.float32), 0.0)
    n = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / n
    d = tl.where(valid, means - mean, 0.0)
    m2 = tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)
    var = tl.maximum(m2 / n, 0.0)
    return mean, 1.0 / tl.sqrt_rn(var + eps)


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit(do_not_specialize=["S", "CG", "G", "SPLIT", "SHIFT_STRIDE"])
def _gn_stats_ncs_kernel(
    x_ptr,
    shift_ptr,
    mean_ptr,
    m2_ptr,
    S,
    CG,
    G,
    L,
    CHUNK,
    SPLIT,
    SHIFT_STRIDE,
    HAS_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Contiguous (N, C, S): group ``n G + g`` is the run ``[(n G + g) L, (n G + g + 1) L)``; program
    (group, k) reduces chunk k. With ``HAS_SHIFT``, element ``idx`` of the group is in channel
    ``g CG + idx // S``, so its shift is ``shift[n SHIFT_STRIDE + g CG + idx // S]`` (``S``, ``CG``,
    ``G`` are only read then)."""
    group = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    x_group = x_ptr + group * L
    start = k * CHUNK
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + offs
        valid = idx < L
        x = tl.load(x_group + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_SHIFT:  # invalid lanes stay 0 (shift loaded as 0 there)
            sh = shift_ptr + (group // G) * SHIFT_STRIDE + (group % G) * CG
            x = x + tl.load(sh + idx // S, mask=valid, other=0.0).to(tl.float32)
        count, mean, m2 = _welford_update(x, valid, count, mean, m2, i // BLOCK)
    mu, m2_sum = _welford_finish(count, mean, m2)
    tl.store(mean_ptr + group * SPLIT + k, mu)
    tl.store(m2_ptr + group * SPLIT + k, m2_sum)


@triton.jit(do_not_specialize=["C", "CG", "L", "STAT_CHUNK", "STAT_SPLIT", "SHIFT_STRIDE"])
def _gn_apply_ncs_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    mean_ptr,
    m2_ptr,
    C,
    S,
    CG,
    L,
    STAT_CHUNK,
    STAT_SPLIT,
    CHUNK,
    SHIFT_STRIDE,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    """Contiguous (N, C, S): program (n C + c, k) normalises chunk k of channel c's spatial run (after
    adding ``shift[n SHIFT_STRIDE + c]`` with ``HAS_SHIFT``)."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    c = row % C
    mean, rstd = _merged_stats(mean_ptr, m2_ptr, row // CG, L, STAT_CHUNK, 1, STAT_SPLIT, eps, BLOCK_SPLIT)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c).to(tl.float32)
    beta = 0.0
    if HAS_B:
        beta = tl.load(b_ptr + c).to(tl.float32)
    x_shift = 0.0
    if HAS_SHIFT:
        x_shift = tl.load(shift_ptr + (row // C) * SHIFT_STRIDE + c).to(tl.float32)
    x_row = x_ptr + row * S
    y_row = y_ptr + row * S
    start = k * CHUNK
    offs = tl.arange(0, BLOCK)
    for i in range(0, CHUNK, BLOCK):
        idx = start + i + offs
        valid = idx < S
        x = tl.load(x_row + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = x + x_shift
        y = _activate((x - mean) * scale + beta, ACT)
        tl.store(y_row + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _nhwc_tile(C, CG, G, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """Sample ``n`` and column tile ``c0 + [0, BLOCK_C)`` of program ``(n tiles + t, k)``; the groups
    ``g`` the tile can touch, ``touched`` (it holds channels of them), and the one-hot map ``hot``
    ``[BLOCK_G, BLOCK_C]`` of its (valid) columns to them."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(C, BLOCK_C)
    n = pid // tiles
    c0 = (pid % tiles) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    g = c0 // CG + tl.arange(0, BLOCK_G)
    touched = (g < G) & (g * CG < tl.minimum(c0 + BLOCK_C, C))
    hot = ((cols // CG)[None, :] == g[:, None]) & col_ok[None, :]
    return n, c0, cols, col_ok, g, touched, hot


@triton.jit
def _activate_fast(y, ACT: tl.constexpr):
    """SiLU with a full-range approximate float32 divide (``div.full.f32``: within 2 float32 ulps, no
    IEEE rounding sequence); the channels_last apply pass, where the divide's cost shows."""
    if ACT == "silu":
        y = tl.fdiv(y, 1.0 + tl.exp(-y), ieee_rounding=False)
    return y


@triton.jit
def phase_source_index(n, p, cols, H, W, C):
    """Where channels ``cols`` of pixel ``p`` of sample ``n`` of the interleaved ``(N, 2H, 2W, C)`` map
    lie in the channels_last ``(N, H + 1, W + 1, 4C)`` sub-pixel phase map: output pixel
    ``(2i + a, 2j + b)`` takes channels ``(2a + b) C + c`` of phase pixel ``(i + a, j + b)``
    (:mod:`ldm_sdk.accel.subpixel`); ``[len(p), len(cols)]`` offsets."""
    x = p % (2 * W)
    y = p // (2 * W)
    a = y % 2
    b = x % 2
    src_pix = (n * (H + 1) + y // 2 + a) * (W + 1) + x // 2 + b
    return src_pix[:, None] * (4 * C) + ((2 * a + b) * C)[:, None] + cols[None, :]


@triton.jit
def add_bias_residual(
    v,
    r_ptr,
    idx,
    valid,
    bias,
    rbias,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
):
    """``(v + bias) + (r[idx] + rbias)`` in float32 for a float32 ``v`` (terms by the flags; ``bias`` /
    ``rbias`` already loaded in ``v``'s shape or broadcastable to it): the sum of the bias + residual
    kernels (:mod:`ldm_sdk.accel.residual_kernels`) and of the fused statistics pass."""
    if HAS_BIAS:
        v = v + bias
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_RBIAS:
            r = r + rbias
        v = v + r
    return v


@triton.jit
def _stats_tile(
    x_ptr,
    y_ptr,
    r_ptr,
    idx,
    valid,
    bias,
    rbias,
    n,
    p,
    cols,
    C,
    PH,
    PW,
    SOURCE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
):
    """One tile (pixels ``p`` of sample ``n``, channels ``cols``; ``idx`` their offsets in ``x``) of the
    statistics pass in float32, invalid lanes 0. ``SOURCE`` (:data:`SOURCE_LOAD` ...): ``x`` loaded; or
    ``(y + bias) + (r + rbias)``, or the sub-pixel phases of ``y`` (a ``(PH + 1, PW + 1)`` map) at
    ``p`` plus ``bias``, formed in float32, rounded to ``x``'s dtype, stored to ``x`` and taken as
    rounded (the values a later pass over ``x`` reads)."""
    if SOURCE == 0:
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    else:
        if SOURCE == 2:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            src = phase_source_index(n, p, cols, PH, PW, C)
        else:
            src = idx
        v = tl.load(y_ptr + src, mask=valid, other=0.0).to(tl.float32)
        v = add_bias_residual(
            v, r_ptr, idx, valid, bias[None, :], rbias[None, :], HAS_BIAS, HAS_RESIDUAL, HAS_RBIAS
        )
        rounded = v.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + idx, rounded, mask=valid)
        x = tl.where(valid, rounded.to(tl.float32), 0.0)
    return x


@triton.jit(do_not_specialize=["G", "SPLIT", "SHIFT_STRIDE", "PH", "PW"])
def _gn_stats_nhwc_kernel(
    x_ptr,
    shift_ptr,
    y_ptr,
    b_ptr,
    r_ptr,
    rb_ptr,
    mean_ptr,
    m2_ptr,
    count_ptr,
    C,
    S,
    CG,
    G,
    CHUNK,
    SPLIT,
    SHIFT_STRIDE,
    PH,
    PW,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PARTS: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SOURCE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RBIAS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """channels_last (N, S, C): program (n tiles + t, k) reduces rows ``[k CHUNK, (k + 1) CHUNK)`` of
    column tile t (``BLOCK_C`` contiguous channels, coalesced). Per lane it sums ``d = x - pivot`` and
    ``d * d`` in float32, the pivot being each column's mean over the chunk's first tile (a peeled
    iteration), so the sums hold deviations of about one standard deviation whatever the column's
    offset: ``M2 = sum d^2 - (sum d)^2 / rows`` then loses at most ``(pivot - mean)^2 rows / M2`` of
    float32 precision, which is about one for any column and at most ``rows / BLOCK_S`` even when the
    first tile holds an outlier. Per column: ``mean = pivot + sum d / rows``, then ``shift`` (a
    per-column constant, it moves the mean only) is added to the mean; per group of the tile the
    columns are merged by Chan's formula, and one partial (mean, M2, count) is written per touched
    group: part 0 if the group starts in this tile, else part 1 (``PARTS`` 2: a group that ends in the
    tile it starts in also writes an empty part 1, so every slot is written). The row loop is software
    pipelined (``STAGES`` loads in flight). ``SOURCE`` other than :data:`SOURCE_LOAD`: the tiles are
    first written from ``y`` (a bias + residual sum, or the interleave of sub-pixel phases:
    :func:`_stats_tile`), whose statistics are then taken."""
    n, c0, cols, col_ok, g, touched, hot = _nhwc_tile(C, CG, G, BLOCK_C, BLOCK_G)
    k = tl.program_id(1).to(tl.int64)
    base = n * S * C + k * CHUNK * C
    rows = tl.arange(0, BLOCK_S)
    end = tl.minimum(S - k * CHUNK, CHUNK).to(tl.int32)  # rows of this chunk: >= 1
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    rbias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RBIAS:
        rbias = tl.load(rb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # the first tile: pivot = its column means; its deviations start the sums
    valid = (rows < end)[:, None] & col_ok[None, :]
    idx = base + rows[:, None].to(tl.int64) * C + cols[None, :]
    p = k * CHUNK + rows
    x = _stats_tile(
        x_ptr, y_ptr, r_ptr, idx, valid, bias, rbias, n, p, cols, C, PH, PW,
        SOURCE, HAS_BIAS, HAS_RESIDUAL, HAS_RBIAS,
    )  # fmt: skip
    pivot = tl.sum(x, axis=0) / tl.minimum(end, BLOCK_S).to(tl.float32)
    s1 = tl.where(valid, x - pivot[None, :], 0.0)
    s2 = s1 * s1
    for i in tl.range(BLOCK_S, end, BLOCK_S, num_stages=STAGES):
        r = i + rows
        valid = (r < end)[:, None] & col_ok[None, :]
        idx = base + r[:, None].to(tl.int64) * C + cols[None, :]  # 64-bit: a chunk may span 2**31
        x = _stats_tile(
            x_ptr, y_ptr, r_ptr, idx, valid, bias, rbias, n, k * CHUNK + r, cols, C, PH, PW,
            SOURCE, HAS_BIAS, HAS_RESIDUAL, HAS_RBIAS,
        )  # fmt: skip
        d = tl.where(valid, x - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    # per column: every valid column holds the chunk's rows
    nrows = end.to(tl.float32)
    t1 = tl.sum(s1, axis=0)
    col_mu = pivot + t1 / nrows
    col_m2 = tl.maximum(tl.sum(s2, axis=0) - t1 * (t1 / nrows), 0.0)
    if HAS_SHIFT:
        col_mu += tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    # per group: Chan over the group's columns of the tile (equal counts)
    ncols = tl.sum(hot.to(tl.float32), axis=1)
    grp_mu = tl.sum(tl.where(hot, col_mu[None, :], 0.0), axis=1) / tl.maximum(ncols, 1.0)
    dg = col_mu[None, :] - grp_mu[:, None]
    grp_m2 = tl.sum(tl.where(hot, col_m2[None, :] + nrows * dg * dg, 0.0), axis=1)
    grp_n = ncols * nrows
    starts_here = g * CG >= c0
    slot = (n * G + g) * PARTS * SPLIT + k
    if PARTS == 2:
        slot = tl.where(starts_here, slot, slot + SPLIT)
    tl.store(mean_ptr + slot, grp_mu, mask=touched)
    tl.store(m2_ptr + slot, grp_m2, mask=touched)
    tl.store(count_ptr + slot, grp_n, mask=touched)
    if PARTS == 2:
        ends_here = touched & starts_here & ((g + 1) * CG <= c0 + BLOCK_C)
        empty = ((n * G + g) * 2 + 1) * SPLIT + k
        zero = tl.zeros([BLOCK_G], dtype=tl.float32)
        tl.store(mean_ptr + empty, zero, mask=ends_here)
        tl.store(m2_ptr + empty, zero, mask=ends_here)
        tl.store(count_ptr + empty, zero, mask=ends_here)


@triton.jit(do_not_specialize=["G", "SPLIT", "SHIFT_STRIDE"])
def _gn_apply_nhwc_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    mean_ptr,
    m2_ptr,
    count_ptr,
    C,
    S,
    CG,
    G,
    CHUNK,
    SPLIT,
    SHIFT_STRIDE,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_PS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """channels_last: program (n tiles + t, j) merges the partials of the groups its column tile
    touches (Chan), spreads their mean / rstd over the columns, and normalises the rows of chunk
    ``k = SPLIT - 1 - j`` of the tile, last tile first, with per-column scale and offset (``shift``
    folded into the offset: ``x + shift - mean = x - (mean - shift)``). The walk runs backwards (the
    first programs take the last chunks, each walks its rows last to first) so that it starts on what
    the statistics pass read last, still in L2. The row loop is software pipelined."""
    n, _, cols, col_ok, g, touched, hot = _nhwc_tile(C, CG, G, BLOCK_C, BLOCK_G)
    k = SPLIT - 1 - tl.program_id(1).to(tl.int64)
    j = tl.arange(0, BLOCK_PS)
    ok = touched[:, None] & (j < PARTS * SPLIT)[None, :]
    src = (n * G + g)[:, None] * (PARTS * SPLIT) + j[None, :]
    means = tl.load(mean_ptr + src, mask=ok, other=0.0)
    m2s = tl.load(m2_ptr + src, mask=ok, other=0.0)
    counts = tl.load(count_ptr + src, mask=ok, other=0.0)
    grp_n = tl.sum(counts, axis=1)
    grp_mu = tl.sum(counts * means, axis=1) / tl.maximum(grp_n, 1.0)
    d = tl.where(counts > 0, means - grp_mu[:, None], 0.0)
    var = tl.maximum((tl.sum(m2s, axis=1) + tl.sum(counts * d * d, axis=1)) / tl.maximum(grp_n, 1.0), 0.0)
    grp_rstd = 1.0 / tl.sqrt_rn(var + eps)
    mu = tl.sum(tl.where(hot, grp_mu[:, None], 0.0), axis=0)
    scale = tl.sum(tl.where(hot, grp_rstd[:, None], 0.0), axis=0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        mu = mu - tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    offset = n * S * C + k * CHUNK * C
    rows = tl.arange(0, BLOCK_S)
    end = tl.minimum(S - k * CHUNK, CHUNK).to(tl.int32)
    last = tl.cdiv(end, BLOCK_S) * BLOCK_S - BLOCK_S  # first row of the chunk's last tile
    for i in tl.range(0, end, BLOCK_S, num_stages=STAGES):
        r = (last - i) + rows
        valid = (r < end)[:, None] & col_ok[None, :]
        idx = offset + r[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        y = _activate_fast((x - mu[None, :]) * scale[None, :] + beta[None, :], ACT)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["G", "SHIFT_STRIDE"])
def _gn_single_pass_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    C,
    S,
    G,
    STRIDE_S,
    STRIDE_C,
    SHIFT_STRIDE,
    eps,
    CG: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    """Program ``n G + g`` normalises group g of sample n whole: its ``S x CG`` tile (element (s, j)
    at ``n C S + s STRIDE_S + (g CG + j) STRIDE_C``: channels_last or contiguous) in registers, the mean
    then the variance of the centred tile, then the affine and activation. ``CG`` is a constexpr: its
    power-of-two factor proves each group's channels_last row segment aligned (8 channels, 16 bytes, at
    ``CG`` = 40), so the segments are loaded and stored as vectors, not element by element (at 16 x 16 x
    1280, batch 2: 4.7 against 10.3 us, ``bench/probe_single_pass.py``)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    j = tl.arange(0, BLOCK_CG)
    c = (pid % G) * CG + j
    rows = tl.arange(0, BLOCK_S)
    col_ok = j < CG
    valid = (rows < S)[:, None] & col_ok[None, :]
    idx = n * C * S + rows[:, None].to(tl.int64) * STRIDE_S + c[None, :] * STRIDE_C
    x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x = x + tl.load(shift_ptr + n * SHIFT_STRIDE + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = tl.where(valid, x, 0.0)
    count = S * CG * 1.0  # float32 (S may be specialised to the constant 1)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(valid, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    scale = tl.full([BLOCK_CG], 1.0, tl.float32) / tl.sqrt_rn(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.zeros([BLOCK_CG], dtype=tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
    y = _activate(d * scale[None, :] + beta[None, :], ACT)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["ROWS"])
def _geglu_kernel(h_ptr, y_ptr, ROWS, INNER, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``y[r, j] = h[r, j] * gelu(h[r, INNER + j])`` over a BLOCK_R x BLOCK_C tile."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = (r < ROWS)[:, None] & (j < INNER)[None, :]
    src = r[:, None] * (2 * INNER) + j[None, :]
    a = tl.load(h_ptr + src, mask=valid, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + src + INNER, mask=valid, other=0.0).to(tl.float32)
    y = a * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
    tl.store(y_ptr + r[:, None] * INNER + j[None, :], y.to(y_ptr.dtype.element_ty), mask=valid)
