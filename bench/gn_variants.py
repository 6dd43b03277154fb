"""Candidate channels_last GroupNorm(+SiLU) kernels against the package's (``group_norm_act_triton``) at the
SD-1.5 UNet's norm shapes (or, ``--vae``, the kl-f8 decoder's), timed in one run: which changes bring the
two-pass norm closer to the H100's memory bandwidth at large maps.

The package's channels_last two-pass path now follows ``sumsq_c64_t4096_w8_rev_fast_pipe3`` (with the
pivot a column's mean over the chunk's first tile); ``old_pkg`` keeps the package's kernels from before that
change (copied here), so one run shows old against new.

The variants (standalone here, not in the package) keep the package's maths -- float32 statistics over
the group (after adding the per-(n, c) ``shift``), ``(x - mean) * rstd * w + b``, SiLU, one rounding -- and
its scheme: a statistics kernel writes partials per (sample, group, part, row chunk), an apply kernel
merges them (Chan) and normalises. What they change:

* ``sumsq``: per-lane float32 sum and sum of squares of ``x - pivot`` (the pivot: each column's value in
  the chunk's first row; the shift, a per-column constant, only moves the column mean) instead of a
  Welford update per element; columns merged into groups by Chan's formula, chunks likewise;
* ``cN`` / ``tN`` / ``wN``: column tile of N channels (2N-byte rows) / N elements per tile / N warps;
* ``aN``: apply grid of N programs per SM (rows per program grow; the group statistics are merged once per
  program) instead of the statistics kernel's grid;
* ``rev``: the apply kernel walks the row chunks last-to-first, so it first reads what the statistics
  kernel read last (still in L2);
* ``fast``: SiLU as ``y * approx_rcp(1 + exp(-y))`` (``tl.fdiv``, ieee_rounding off) instead of an IEEE
  divide; ``pipeN``: ``tl.range(num_stages=N)`` on the row loops;
* ``gloop``: one launch, one program per (sample, group) that reads its group twice (sums, then
  normalise, the second walk in reverse order for L1 / L2 reuse) -- no grid-wide synchronisation.

Baselines: ``pkg`` (the package's default: single-pass kernel where the group fits, else the two kernels),
``old_pkg`` (the same with the old two kernels: per-lane Welford, 32-column tiles of 2048 elements, plain
loops), ``pkg_c128`` (the package's kernels with 128-channel column tiles where they pad C by <= 1/8),
``torch`` (``F.group_norm`` + ``F.silu`` in fp16) and ``copy`` (``y.copy_(x)``: one read and one write, the
floor). By default the run takes copy, torch, old_pkg, pkg and the pipe3 variant (``--variants all``: every
variant and baseline; ``--variants NAMES``: those variants / baselines besides copy, old_pkg and pkg).

Every Triton kernel variant the run will launch is first recorded and compiled on a thread pool
(``ldm_sdk.accel.precompile``'s helpers), so a fresh machine compiles in seconds, not one after another.

Each (variant, case) is checked against ``group_norm_act_reference`` (``compare_ulps``) and timed in a
CUDA graph of repeated calls: ``hot`` (the same input every call) and ``cold`` (cycling over input copies
3 L2 sizes apart). A variant that fails to compile or run is recorded and skipped. Totals: sum over the
GroupNorm calls of one SD-1.5 UNet forward (61 norms: ResBlock norm1 SiLU, norm2 SiLU + shift, transformer
norm without activation, output norm), where a variant is timed only at the cases where the package takes
the two kernels (elsewhere the package's single-pass time counts for every variant); ``--vae``: the
decoder's norms at [1, 128, 512^2], [1, 256, 256^2], [1, 512, 128^2], [1, 512, 64^2] (32 groups, SiLU,
eps 1e-6; weighted by how many of the decoder's norms have each shape).

    python bench/gn_variants.py --batch 16 --out gn_variants_b16.json     # H100, aimed at < 90 s
    python bench/gn_variants.py --batch 2 --out gn_variants_b2.json
    python bench/gn_variants.py --vae --out gn_variants_vae.json          # batch 1
    python bench/gn_variants.py --batch 16 --variants all                 # every variant (minutes)
    TRITON_INTERPRET=1 python bench/gn_variants.py --cpu-dry-run [--vae]  # code paths on CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_group_norm as T

from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.benchmarks import common as C

MAX_SPLIT = 128  # row chunks per column tile (the apply kernel merges 2 x this many partials per group)


# -- kernels -------------------------------------------------------------------------------------------------
@triton.jit
def _silu(y, ACT: tl.constexpr, FAST: tl.constexpr):
    if ACT == "silu":
        if FAST:  # noqa: SIM108 (constexpr branches)
            y = tl.fdiv(y, 1.0 + tl.exp(-y), ieee_rounding=False)
        else:
            y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _tile_groups(pid, C, CG, G, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    """Sample, first column, columns and the groups the column tile of program ``pid`` touches."""
    tiles = tl.cdiv(C, BLOCK_C)
    n = pid // tiles
    c0 = (pid % tiles) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    g = c0 // CG + tl.arange(0, BLOCK_G)
    touched = (g < G) & (g * CG < tl.minimum(c0 + BLOCK_C, C))
    hot = ((cols // CG)[None, :] == g[:, None]) & col_ok[None, :]
    return n, c0, cols, col_ok, g, touched, hot


@triton.jit(do_not_specialize=["CG", "G", "SPLIT", "SHIFT_STRIDE"])
def _v_stats_kernel(
    x_ptr,
    shift_ptr,
    mean_ptr,
    m2_ptr,
    C,
    S,
    CG,
    G,
    CHUNK,
    SPLIT,
    SHIFT_STRIDE,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SUMSQ: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program (n tiles + t, k): rows ``[k CHUNK, (k + 1) CHUNK)`` of column tile t; per lane sums of
    ``x - pivot`` (``SUMSQ``) or Welford, then per column, then per group of the tile; one partial (mean,
    M2) per touched group at slot ``((n G + g) 2 + part) SPLIT + k``, part 1 when the group started in the
    previous tile. Counts are implied (columns of the group in the tile x rows of the chunk)."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    n, c0, cols, col_ok, g, touched, hot = _tile_groups(pid, C, CG, G, BLOCK_C, BLOCK_G)
    rows = tl.arange(0, BLOCK_S)
    start = k * CHUNK
    nrows = tl.minimum(S - start, CHUNK).to(tl.float32)  # >= 1: every chunk starts inside the map
    x_base = x_ptr + n * S * C
    if SUMSQ:
        pivot = tl.load(x_base + start * C + cols, mask=col_ok, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for i in tl.range(0, CHUNK, BLOCK_S, num_stages=STAGES):
            r = start + i + rows
            valid = (r < S)[:, None] & col_ok[None, :]
            x = tl.load(x_base + r[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            d = tl.where(valid, x - pivot[None, :], 0.0)
            s1 += d
            s2 += d * d
        t1 = tl.sum(s1, axis=0)
        t2 = tl.sum(s2, axis=0)
        col_mu = pivot + t1 / nrows
        col_m2 = tl.maximum(t2 - t1 * (t1 / nrows), 0.0)
    else:
        count = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for i in tl.range(0, CHUNK, BLOCK_S, num_stages=STAGES):
            r = start + i + rows
            valid = (r < S)[:, None] & col_ok[None, :]
            x = tl.load(x_base + r[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            # a lane valid at step j was valid at every earlier step (rows only grow): its count is j + 1
            inv = 1.0 / (i // BLOCK_S + 1.0)
            delta = x - mean
            mean = mean + tl.where(valid, delta * inv, 0.0)
            m2 = m2 + tl.where(valid, delta * (x - mean), 0.0)
            count = count + valid.to(tl.float32)
        col_n = tl.sum(count, axis=0)
        col_mu = tl.sum(count * mean, axis=0) / tl.maximum(col_n, 1.0)
        dc = tl.where(count > 0, mean - col_mu[None, :], 0.0)
        col_m2 = tl.sum(m2, axis=0) + tl.sum(count * dc * dc, axis=0)
    if HAS_SHIFT:
        col_mu += tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    # groups of the tile: every column holds nrows elements, so the column means weigh equally
    ncols = tl.sum(hot.to(tl.float32), axis=1)
    grp_mu = tl.sum(tl.where(hot, col_mu[None, :], 0.0), axis=1) / tl.maximum(ncols, 1.0)
    dg = col_mu[None, :] - grp_mu[:, None]
    grp_m2 = tl.sum(tl.where(hot, col_m2[None, :] + nrows * dg * dg, 0.0), axis=1)
    part = (g * CG < c0).to(tl.int64)
    slot = ((n * G + g) * 2 + part) * SPLIT + k
    tl.store(mean_ptr + slot, grp_mu, mask=touched)
    tl.store(m2_ptr + slot, grp_m2, mask=touched)


@triton.jit(do_not_specialize=["CG", "G", "SPLIT", "ASPLIT", "SHIFT_STRIDE"])
def _v_apply_kernel(
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
    G,
    CHUNK,
    SPLIT,
    ACHUNK,
    ASPLIT,
    SHIFT_STRIDE,
    eps,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
    REVERSE: tl.constexpr,
    FAST: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program (n tiles + t, a): merges the partials of the groups its column tile touches, then
    normalises rows ``[a ACHUNK, (a + 1) ACHUNK)`` (``REVERSE``: chunk ``ASPLIT - 1 - a``, rows last to
    first)."""
    pid = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1).to(tl.int64)
    if REVERSE:
        a = ASPLIT - 1 - a
    n, _, cols, col_ok, g, touched, hot = _tile_groups(pid, C, CG, G, BLOCK_C, BLOCK_G)
    # partials [BLOCK_G, 2 BLOCK_SPLIT]: part 0 (the tile holding the group's first channel), part 1
    j = tl.arange(0, 2 * BLOCK_SPLIT)
    part = j // BLOCK_SPLIT
    kk = j % BLOCK_SPLIT
    first_end = (g * CG // BLOCK_C + 1) * BLOCK_C
    cols0 = tl.minimum((g + 1) * CG, first_end) - g * CG
    pcols = tl.where(part[None, :] == 0, cols0[:, None], CG - cols0[:, None])
    krows = tl.minimum(tl.maximum(S - kk.to(tl.int64) * CHUNK, 0), CHUNK)
    ok = touched[:, None] & (kk < SPLIT)[None, :] & (pcols > 0)
    cnt = tl.where(ok, (pcols * krows[None, :]).to(tl.float32), 0.0)
    src = ((n * G + g)[:, None] * 2 + part[None, :]) * SPLIT + kk[None, :]
    means = tl.load(mean_ptr + src, mask=ok, other=0.0)
    m2s = tl.load(m2_ptr + src, mask=ok, other=0.0)
    grp_n = tl.maximum(tl.sum(cnt, axis=1), 1.0)
    grp_mu = tl.sum(cnt * means, axis=1) / grp_n
    d = tl.where(ok, means - grp_mu[:, None], 0.0)
    var = tl.maximum((tl.sum(m2s, axis=1) + tl.sum(cnt * d * d, axis=1)) / grp_n, 0.0)
    grp_rstd = 1.0 / tl.sqrt_rn(var + eps)
    mu = tl.sum(tl.where(hot, grp_mu[:, None], 0.0), axis=0)
    scale = tl.sum(tl.where(hot, grp_rstd[:, None], 0.0), axis=0)
    scale = scale * tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:  # (x + shift - mu): fold the shift into the subtrahend
        mu = mu - tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    offset = n * S * C
    rows = tl.arange(0, BLOCK_S)
    start = a * ACHUNK
    for i in tl.range(0, ACHUNK, BLOCK_S, num_stages=STAGES):
        if REVERSE:  # noqa: SIM108 (constexpr branches)
            r = start + (ACHUNK - BLOCK_S - i) + rows
        else:
            r = start + i + rows
        valid = (r < S)[:, None] & col_ok[None, :]
        idx = offset + r[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        y = _silu((x - mu[None, :]) * scale[None, :] + beta[None, :], ACT, FAST)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["CG", "G", "SHIFT_STRIDE"])
def _v_group_loop_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    C,
    S,
    CG,
    G,
    SHIFT_STRIDE,
    eps,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CG: tl.constexpr,
    FAST: tl.constexpr,
):
    """Program n G + g: sums of ``x - pivot`` over the group's ``S x CG`` block (pivot: row 0), then a
    second walk, last rows first, that normalises."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK_CG)
    col_ok = j < CG
    cols = g * CG + j
    rows = tl.arange(0, BLOCK_S)
    x_base = x_ptr + n * S * C
    pivot = tl.load(x_base + cols, mask=col_ok, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_S, BLOCK_CG], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_S, BLOCK_CG], dtype=tl.float32)
    for i in range(0, S, BLOCK_S):
        r = i + rows
        valid = (r < S)[:, None] & col_ok[None, :]
        x = tl.load(x_base + r[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        dx = tl.where(valid, x - pivot[None, :], 0.0)
        s1 += dx
        s2 += dx * dx
    t1 = tl.sum(s1, axis=0)
    t2 = tl.sum(s2, axis=0)
    s_f = S.to(tl.float32)
    col_mu = pivot + t1 / s_f
    col_m2 = tl.maximum(t2 - t1 * (t1 / s_f), 0.0)
    if HAS_SHIFT:
        col_mu += tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    cg_f = CG.to(tl.float32)
    mu = tl.sum(tl.where(col_ok, col_mu, 0.0), axis=0) / cg_f
    dm = tl.where(col_ok, col_mu - mu, 0.0)
    var = tl.maximum((tl.sum(col_m2, axis=0) + s_f * tl.sum(dm * dm, axis=0)) / (s_f * cg_f), 0.0)
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    scale = rstd * tl.load(w_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    sub = tl.zeros([BLOCK_CG], dtype=tl.float32) + mu
    if HAS_SHIFT:
        sub = sub - tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    y_base = y_ptr + n * S * C
    last = tl.cdiv(S, BLOCK_S) * BLOCK_S - BLOCK_S
    for i in range(0, S, BLOCK_S):
        r = (last - i) + rows
        valid = (r < S)[:, None] & col_ok[None, :]
        idx = r[:, None] * C + cols[None, :]
        x = tl.load(x_base + idx, mask=valid, other=0.0).to(tl.float32)
        y = _silu((x - sub[None, :]) * scale[None, :] + beta[None, :], ACT, FAST)
        tl.store(y_base + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


# -- the package's channels_last kernels before the pivoted / pipelined rework ("old_pkg") -------------------
# Copied from ldm_sdk/accel/triton_kernels.py as it was before (per-lane Welford statistics, 32-column
# tiles of <= 2048 elements at _warps(tile) warps, plain row loops, chunks walked first to last, IEEE SiLU
# divide), so one run can time the old and the new package path side by side.
@triton.jit
def _old_welford_update(x, valid, count, mean, m2, step):
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
def _old_activate(y, ACT: tl.constexpr):
    if ACT == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit(do_not_specialize=["G", "SPLIT", "SHIFT_STRIDE"])
def _old_stats_kernel(
    x_ptr,
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
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PARTS: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """channels_last (N, S, C): program (n tiles + t, k) reduces rows ``[k CHUNK, (k + 1) CHUNK)`` of
    column tile t (``BLOCK_C`` contiguous channels, coalesced) per lane, then per column (Chan), then
    per group of the tile (Chan over the group's columns), and writes one partial per touched group:
    part 0 if the group starts in this tile, else part 1 (``PARTS`` 2: a group that ends in the tile it
    starts in also writes an empty part 1, so every slot is written). With ``HAS_SHIFT`` the tile's
    ``shift[n SHIFT_STRIDE + cols]`` is added to every valid element (invalid ones stay 0)."""
    n, c0, cols, col_ok, g, touched, hot = _tile_groups(
        tl.program_id(0).to(tl.int64), C, CG, G, BLOCK_C, BLOCK_G
    )
    k = tl.program_id(1).to(tl.int64)
    x_tile = x_ptr + n * S * C
    rows = tl.arange(0, BLOCK_S)
    count = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    if HAS_SHIFT:
        x_shift = tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    start = k * CHUNK
    for i in range(0, CHUNK, BLOCK_S):
        r = start + i + rows
        valid = (r < S)[:, None] & col_ok[None, :]
        x = tl.load(x_tile + r[:, None] * C + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = tl.where(valid, x + x_shift[None, :], 0.0)
        count, mean, m2 = _old_welford_update(x, valid, count, mean, m2, i // BLOCK_S)
    # per column: Chan over the rows
    col_n = tl.sum(count, axis=0)
    col_mu = tl.sum(count * mean, axis=0) / tl.maximum(col_n, 1.0)
    d = tl.where(count > 0, mean - col_mu[None, :], 0.0)
    col_m2 = tl.sum(m2, axis=0) + tl.sum(count * d * d, axis=0)
    # per group: Chan over the group's columns of the tile
    grp_n = tl.sum(tl.where(hot, col_n[None, :], 0.0), axis=1)
    grp_mu = tl.sum(tl.where(hot, (col_n * col_mu)[None, :], 0.0), axis=1) / tl.maximum(grp_n, 1.0)
    dg = col_mu[None, :] - grp_mu[:, None]
    grp_m2 = tl.sum(tl.where(hot, col_m2[None, :] + col_n[None, :] * dg * dg, 0.0), axis=1)
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
def _old_apply_kernel(
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
):
    """channels_last: program (n tiles + t, k) merges the partials of the groups its column tile
    touches (Chan), spreads their mean / rstd over the columns, and normalises rows
    ``[k CHUNK, (k + 1) CHUNK)`` of the tile with per-column scale and offset (after adding the
    tile's ``shift[n SHIFT_STRIDE + cols]`` with ``HAS_SHIFT``)."""
    n, _, cols, col_ok, g, touched, hot = _tile_groups(
        tl.program_id(0).to(tl.int64), C, CG, G, BLOCK_C, BLOCK_G
    )
    k = tl.program_id(1).to(tl.int64)
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
        x_shift = tl.load(shift_ptr + n * SHIFT_STRIDE + cols, mask=col_ok, other=0.0).to(tl.float32)
    offset = n * S * C
    rows = tl.arange(0, BLOCK_S)
    start = k * CHUNK
    for i in range(0, CHUNK, BLOCK_S):
        r = start + i + rows
        valid = (r < S)[:, None] & col_ok[None, :]
        idx = offset + r[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            x = x + x_shift[None, :]
        y = _old_activate((x - mu[None, :]) * scale[None, :] + beta[None, :], ACT)
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


# -- plans and launchers -------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class Variant:
    """A two-kernel configuration (``kind`` "two"), or the per-group loop (``kind`` "gloop")."""

    name: str
    kind: str = "two"
    block_c: int = 64  # preferred column tile (widened to the group, narrowed while it wastes > 1/8)
    tile: int = 2048  # elements per tile
    warps: int = 4
    stats_per_sm: int = 4
    apply_per_sm: int = 0  # 0: the statistics grid
    sumsq: bool = True
    reverse: bool = False
    fast: bool = False
    stages: int = 1


VARIANTS: list[Variant] = [
    Variant("welford_c32_t2048_w4", block_c=32, sumsq=False),  # ~ the package's tiles in this scheme
    Variant("sumsq_c32_t2048_w4", block_c=32),
    Variant("sumsq_c64_t4096_w8", block_c=64, tile=4096, warps=8),
    Variant("sumsq_c128_t4096_w8", block_c=128, tile=4096, warps=8),
    Variant("sumsq_c128_t4096_w8_a2", block_c=128, tile=4096, warps=8, apply_per_sm=2),
    Variant("sumsq_c64_t4096_w8_rev", block_c=64, tile=4096, warps=8, reverse=True),
    Variant("sumsq_c64_t4096_w8_rev_fast", block_c=64, tile=4096, warps=8, reverse=True, fast=True),
    Variant(
        "sumsq_c64_t4096_w8_rev_fast_pipe3", block_c=64, tile=4096, warps=8, reverse=True, fast=True, stages=3
    ),
    Variant("gloop_t4096_w8", kind="gloop", tile=4096, warps=8),
    Variant("gloop_t4096_w8_fast", kind="gloop", tile=4096, warps=8, fast=True),
]


def column_tile(c: int, cg: int, preferred: int) -> int:
    """The widest power of two <= ``preferred`` (and >= 32 and the group) that pads C by at most 1/8."""
    floor = max(_pow2(cg), min(32, _pow2(c)))
    width = max(floor, preferred)
    while width > floor and math.ceil(c / width) * width - c > c // 8:
        width //= 2
    return width


@dataclass(frozen=True)
class Plan:
    block_c: int
    block_s: int
    block_g: int
    chunk: int
    split: int
    achunk: int
    asplit: int
    block_split: int


def _chunks(s: int, block_s: int, parallel: int, target: int) -> tuple[int, int]:
    tiles = math.ceil(s / block_s)
    split = min(tiles, max(1, math.ceil(target / max(1, parallel))), MAX_SPLIT)
    chunk = math.ceil(tiles / split) * block_s
    return chunk, math.ceil(s / chunk)


def plan(v: Variant, n: int, c: int, s: int, groups: int, sms: int) -> Plan:
    cg = c // groups
    block_c = column_tile(c, cg, v.block_c)
    block_s = max(1, min(v.tile // block_c, _pow2(s)))
    block_g = max(8, _pow2((block_c - 1) // cg + 2))
    parallel = n * math.ceil(c / block_c)
    chunk, split = _chunks(s, block_s, parallel, v.stats_per_sm * sms)
    if v.apply_per_sm:
        achunk, asplit = _chunks(s, block_s, parallel, v.apply_per_sm * sms)
    else:
        achunk, asplit = chunk, split
    return Plan(block_c, block_s, block_g, chunk, split, achunk, asplit, max(16, _pow2(split)))


@dataclass(frozen=True)
class OldPlan:
    block_c: int
    block_s: int
    block_g: int
    parts: int
    chunk: int
    split: int
    warps: int


OLD_MAX_BLOCK = 2048  # the old package's tile (elements)
OLD_MIN_COLS = 32  # the old package's column-tile floor
OLD_MAX_SPLIT = 1024
OLD_MAX_CHUNK = 2**24


def old_plan(n: int, c: int, s: int, groups: int, target: int, max_block: int = OLD_MAX_BLOCK) -> OldPlan:
    """The old package's channels_last plan (``plan_group_norm`` with its ``_chunking``), copied."""
    cg = c // groups
    block_c = max(_pow2(cg), min(OLD_MIN_COLS, _pow2(c)))
    parts = 1 if block_c % cg == 0 else 2
    block_g = _pow2(block_c // cg) if parts == 1 else _pow2((block_c - 1) // cg + 2)
    block_s = max(1, min(max_block // block_c, _pow2(s)))
    parallel = n * math.ceil(c / block_c)
    tiles = max(1, math.ceil(s / block_s))
    split = min(tiles, max(1, math.ceil(target / max(1, parallel))), OLD_MAX_SPLIT // parts)
    per_chunk = min(math.ceil(tiles / split), max(1, OLD_MAX_CHUNK // (block_s * min(cg, block_c))))
    split = math.ceil(tiles / per_chunk)
    warps = min(8, max(1, block_s * block_c // 512))
    return OldPlan(block_c, block_s, block_g, parts, per_chunk * block_s, split, warps)


def make_old_pkg_call(
    x: Tensor,
    inp: T.Inputs,
    case: T.Case,
    sms: int,
    recorder: K.KernelRecorder | None = None,
    max_block: int = OLD_MAX_BLOCK,
) -> Callable[[], Tensor]:
    """The old package path: the single-pass kernel (unchanged) where the group fits, else the old two
    channels_last kernels with the old plan."""
    n, c, hh, ww = x.shape
    if T.package_single_pass(n, c, hh):
        return functools.partial(
            K.group_norm_act_triton, x, inp.w, inp.b, T.GROUPS, case.eps, case.act, shift=inp.shift,
            recorder=recorder,
        )  # fmt: skip
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("old_pkg here takes channels_last inputs")
    s = hh * ww
    cg = c // T.GROUPS
    p = old_plan(n, c, s, T.GROUPS, K.PROGRAMS_PER_SM * sms, max_block)
    y = torch.empty_like(x)
    sh, sh_stride = K._shift_rows(inp.shift) if inp.shift is not None else (x, 0)
    slots = n * T.GROUPS * p.parts * p.split
    mean = torch.empty(slots, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    count = torch.empty_like(mean)
    grid = (n * math.ceil(c / p.block_c), p.split)
    sizes = (c, s, cg, T.GROUPS, p.chunk, p.split, sh_stride)
    tiles = {"BLOCK_S": p.block_s, "BLOCK_C": p.block_c, "BLOCK_G": p.block_g, "PARTS": p.parts}
    has_shift = inp.shift is not None
    flags = {"HAS_W": True, "HAS_B": True, "HAS_SHIFT": has_shift, "ACT": case.act}

    def call_old() -> Tensor:
        K.launch(_old_stats_kernel, grid, recorder, x, sh, mean, m2, count, *sizes, **tiles,
                 HAS_SHIFT=has_shift, num_warps=p.warps)  # fmt: skip
        K.launch(_old_apply_kernel, grid, recorder, x, y, inp.w, inp.b, sh, mean, m2, count, *sizes,
                 float(case.eps), **tiles, BLOCK_PS=max(2, _pow2(p.parts * p.split)), num_warps=p.warps,
                 **flags)  # fmt: skip
        return y

    return call_old


def make_variant_call(
    v: Variant,
    x: Tensor,
    w: Tensor,
    b: Tensor,
    shift: Tensor | None,
    case: T.Case,
    sms: int,
    recorder: K.KernelRecorder | None = None,
) -> Callable[[], Tensor]:
    """A no-argument call that writes ``y`` (allocated here, with the partial buffers) and returns it."""
    n, c, hh, ww = x.shape
    s = hh * ww
    cg = c // T.GROUPS
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("the variants take channels_last inputs")
    y = torch.empty_like(x)
    sh = shift if shift is not None else x
    sh_stride = shift.stride(0) if shift is not None else 0
    if shift is not None and shift.stride(1) != 1:
        raise ValueError("shift needs contiguous channels")
    has_shift = shift is not None
    if v.kind == "gloop":
        block_cg = _pow2(cg)
        block_s = max(1, min(v.tile // block_cg, _pow2(s)))

        def call_gloop() -> Tensor:
            K.launch(
                _v_group_loop_kernel,
                (n * T.GROUPS,),
                recorder,
                x,
                y,
                w,
                b,
                sh,
                c,
                s,
                cg,
                T.GROUPS,
                sh_stride,
                float(case.eps),
                HAS_SHIFT=has_shift,
                ACT=case.act,
                BLOCK_S=block_s,
                BLOCK_CG=block_cg,
                FAST=v.fast,
                num_warps=v.warps,
            )
            return y

        return call_gloop
    p = plan(v, n, c, s, T.GROUPS, sms)
    slots = n * T.GROUPS * 2 * p.split
    mean = torch.zeros(slots, device=x.device, dtype=torch.float32)
    m2 = torch.zeros_like(mean)
    tiles = n * math.ceil(c / p.block_c)

    def call_two() -> Tensor:
        K.launch(
            _v_stats_kernel,
            (tiles, p.split),
            recorder,
            x,
            sh,
            mean,
            m2,
            c,
            s,
            cg,
            T.GROUPS,
            p.chunk,
            p.split,
            sh_stride,
            BLOCK_S=p.block_s,
            BLOCK_C=p.block_c,
            BLOCK_G=p.block_g,
            HAS_SHIFT=has_shift,
            SUMSQ=v.sumsq,
            STAGES=v.stages,
            num_warps=v.warps,
        )
        K.launch(
            _v_apply_kernel,
            (tiles, p.asplit),
            recorder,
            x,
            y,
            w,
            b,
            sh,
            mean,
            m2,
            c,
            s,
            cg,
            T.GROUPS,
            p.chunk,
            p.split,
            p.achunk,
            p.asplit,
            sh_stride,
            float(case.eps),
            HAS_SHIFT=has_shift,
            ACT=case.act,
            BLOCK_S=p.block_s,
            BLOCK_C=p.block_c,
            BLOCK_G=p.block_g,
            BLOCK_SPLIT=p.block_split,
            REVERSE=v.reverse,
            FAST=v.fast,
            STAGES=v.stages,
            num_warps=v.warps,
        )
        return y

    return call_two


DRY_MAX_BLOCK: int | None = None  # --cpu-dry-run: small package tiles, so that chunks and splits occur


def make_baseline_call(
    name: str, x: Tensor, inp: T.Inputs, case: T.Case, sms: int, recorder: K.KernelRecorder | None = None
) -> tuple[Callable[[], Tensor], int]:
    """(call, activation passes it needs): ``pkg``, ``old_pkg``, ``pkg_c128``, ``torch`` or ``copy``."""
    single = T.package_single_pass(x.shape[0], x.shape[1], x.shape[2])
    if name == "old_pkg":
        call_old = make_old_pkg_call(x, inp, case, sms, recorder, DRY_MAX_BLOCK or OLD_MAX_BLOCK)
        return call_old, 1 if single else 2
    if name == "copy":
        y = torch.empty_like(x)
        return functools.partial(y.copy_, x), 1
    if name == "torch":
        return functools.partial(
            T.torch_group_norm_act, x, inp.w, inp.b, T.GROUPS, case.eps, case.act, inp.shift
        ), 2
    kwargs: dict[str, Any] = {"shift": inp.shift, "recorder": recorder, "max_block": DRY_MAX_BLOCK}
    if name == "pkg_c128":
        kwargs.update(single_pass=False, target_programs=4 * sms)

    if name in PKG_TILES:  # the package kernels with a given channels_last tiling
        kwargs["nhwc"] = PKG_TILES[name]
    if name == "pkg_c128":
        kwargs["nhwc"] = replace(WIDE_TILES, cols=128)

    def call() -> Tensor:
        return K.group_norm_act_triton(x, inp.w, inp.b, T.GROUPS, case.eps, case.act, **kwargs)  # type: ignore[arg-type]

    return call, 1 if single and name != "pkg_c128" else 2


WIDE_TILES = K.NhwcTiles(max_block=4096, cols=64, stages=3)  # 64 x 64 tiles on 8 warps, pipelined
PKG_TILES = {
    "pkg_wide": WIDE_TILES,
    "pkg_narrow": K.NHWC_PLAIN,
    "pkg_narrow_s3": K.NHWC_PIPELINED,
}
"""The package kernels with each channels_last tiling forced (``pkg``: the one its plan picks by batch)."""
BASELINES = ("copy", "torch", "old_pkg", "pkg", *PKG_TILES, "pkg_c128")
DEFAULT_BASELINES = ("copy", "torch", "old_pkg", "pkg", *PKG_TILES)
DEFAULT_VARIANTS = ("sumsq_c64_t4096_w8_rev_fast_pipe3",)  # the variant the package now follows


def _baseline_maker(name: str, inp: T.Inputs, case: T.Case, sms: int, x: Tensor) -> Callable[[], Tensor]:
    return make_baseline_call(name, x, inp, case, sms)[0]


def _variant_maker(v: Variant, inp: T.Inputs, case: T.Case, sms: int, x: Tensor) -> Callable[[], Tensor]:
    return make_variant_call(v, x, inp.w, inp.b, inp.shift, case, sms)


def precompile(
    cases: Sequence[T.Case],
    batch: int,
    device: torch.device,
    sms: int,
    baselines: Sequence[str],
    variants: Sequence[Variant],
    all_cases: bool,
) -> dict[str, Any]:
    """Record the Triton launches every (name, case) of the run will make (kernels skipped, on small
    placeholder inputs of the real shapes) and compile the distinct variants on a thread pool, as
    :mod:`ldm_sdk.accel.precompile` does for a model: the timed calls then find them compiled, and a fresh
    machine spends seconds, not minutes, compiling. Under the interpreter: recorded only."""
    from ldm_sdk.accel.precompile import _compile, _variant, default_threads

    recorder = K.KernelRecorder()
    t0 = time.perf_counter()
    for case in cases:
        shape = (batch, case.c, case.h, case.h)
        x = torch.empty(shape, device=device, dtype=torch.float16).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.ones(case.c, device=device, dtype=torch.float16)
        b = torch.zeros_like(w)
        shift = torch.zeros(batch, case.c, device=device, dtype=torch.float16) if case.shift else None
        inp = T.Inputs([x], w, b, shift, x)
        single = T.package_single_pass(batch, case.c, case.h)
        for name in baselines:
            if name not in ("copy", "torch"):
                make_baseline_call(name, x, inp, case, sms, recorder)[0]()
        if not single or all_cases:
            for v in variants:
                make_variant_call(v, x, w, b, shift, case, sms, recorder)()
    unique = list({_variant(launch): launch for launch in recorder.launches}.values())
    threads = min(default_threads(), max(1, len(unique)))
    t1 = time.perf_counter()
    if device.type == "cuda" and unique:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(_compile, launch) for launch in unique]:
                future.result()
    out = {"launches": len(recorder), "variants": len(unique), "threads": threads}
    out.update(record_s=t1 - t0, compile_s=time.perf_counter() - t1)
    done = (
        f"compiled on {threads} threads in {out['compile_s']:.1f} s" if device.type == "cuda" else "recorded"
    )
    print(f"{out['variants']} kernel variants ({out['launches']} launches) {done}", flush=True)
    return out


# kl-f8 decoder (SD VAE) GroupNorms at 512 x 512 px: (C, H), how many of the decoder's norms have that shape
# (32 groups, eps 1e-6, all taken with SiLU here); its two norms at other shapes (512 x 256^2, 256 x 512^2,
# one each, the first ResBlock of a level after the upsample) are left out.
VAE_SHAPES = ((128, 512, 6), (256, 256, 5), (512, 128, 6), (512, 64, 11))
VAE_DRY_SHAPES = ((128, 16, 6), (256, 8, 5), (512, 4, 6), (512, 2, 11))


def vae_norm_calls(dry: bool) -> list[T.NormCall]:
    return [
        T.NormCall(c, h, "silu", False, 1e-6, f"decoder.C{c}_H{h}.{i}")
        for c, h, count in (VAE_DRY_SHAPES if dry else VAE_SHAPES)
        for i in range(count)
    ]


def dry_cases(cases: Sequence[T.Case]) -> list[T.Case]:
    """The largest case and the first of each (activation, shift) kind."""
    picked: list[T.Case] = [cases[0]]
    for case in cases:
        if all((case.act, case.shift) != (p.act, p.shift) for p in picked[1:]) and case not in picked:
            picked.append(case)
    return picked


# -- the run -------------------------------------------------------------------------------------------------
def measure(
    make: Callable[[Tensor], Callable[[], Tensor]],
    inp: T.Inputs,
    passes: int,
    modes: Sequence[str],
    peak: float,
    check: bool,
    reps: int,
    iters: int,
) -> dict[str, Any]:
    """Check (against the reference) and time one (variant, case) in each mode; errors recorded."""
    out: dict[str, Any] = {}
    try:
        calls = [make(x) for x in inp.xs]
        y = calls[0]()
        if check:
            report = K.compare_ulps(y, inp.ref)
            out["ulps"] = T.ulp_dict(report)
        nbytes = T.gn_bytes(inp.xs[0], passes)
        for mode in modes:
            fns = calls if mode == "cold" else calls[:1]
            out[mode] = T.timing_row(T.graph_ms(fns, reps=reps, iters=iters), nbytes, peak)
    except Exception as exc:  # compile / launch failure of one variant: record, go on
        out["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc) else ''}"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    dry = args.cpu_dry_run
    device = torch.device("cpu" if dry else "cuda")
    sms = 2 if dry else torch.cuda.get_device_properties(0).multi_processor_count
    if args.vae:
        calls = vae_norm_calls(dry)
    elif dry:
        calls = T.unet_norm_calls(8, {**C.SD15_UNET, "model_channels": 64})
    else:
        calls = T.unet_norm_calls(args.latent)
    counts = T.case_counts(calls)
    wanted = args.variants or []
    if not wanted:
        variants = [v for v in VARIANTS if v.name in DEFAULT_VARIANTS]
        baselines = list(DEFAULT_BASELINES)
    elif "all" in wanted:
        variants, baselines = list(VARIANTS), list(BASELINES)
    else:
        variants = [v for v in VARIANTS if any(s in v.name for s in wanted)]
        baselines = [b for b in BASELINES if b in wanted or b in ("copy", "old_pkg", "pkg")]
    if dry:  # tiny tiles and a low single-pass limit so that chunks, splits and crossing groups occur
        global DRY_MAX_BLOCK
        DRY_MAX_BLOCK = 128
        variants = [replace(v, tile=min(v.tile, 128), warps=min(v.warps, 4)) for v in variants]
        K.SINGLE_PASS_MAX = 16  # this process only: the package's two kernels at the tiny shapes too
    modes = ["hot"] if dry else args.modes
    res: dict[str, Any] = {
        "device": "cpu (TRITON_INTERPRET)" if dry else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "batch": args.batch,
        "shapes": "kl-f8 decoder (--vae)" if args.vae else f"SD-1.5 UNet, {args.latent}^2 latents",
        "modes": modes,
        "peak_gb_s": args.peak_gb_s,
        "variants": [asdict(v) for v in variants],
        "unet_norm_calls": {k.key: cnt for k, cnt in counts.items()},
        "cases": [],
    }
    t_start = time.perf_counter()
    run_cases = dry_cases(list(counts)) if dry else list(counts)
    res["precompile"] = precompile(run_cases, args.batch, device, sms, baselines, variants, args.all_cases)
    for case in run_cases:
        single = T.package_single_pass(args.batch, case.c, case.h)
        copies = max(T.copies_for(args.batch * case.c * case.h**2 * 2, True), 1) if "cold" in modes else 1
        inp = T.make_inputs(args.batch, case, device, copies)
        row: dict[str, Any] = {
            "case": case.key,
            "shape": [args.batch, case.c, case.h, case.h],
            "calls_per_step": counts[case],
            "package_path": "single" if single else "two-pass",
            "copies": copies,
            "results": {},
        }
        names = list(baselines) + ([v.name for v in variants] if not single or args.all_cases else [])
        for name in names:
            if name in BASELINES:
                passes = make_baseline_call(name, inp.xs[0], inp, case, sms)[1]
                mk = functools.partial(_baseline_maker, name, inp, case, sms)
            else:
                v = next(v for v in variants if v.name == name)
                passes = 1 if v.kind == "gloop" else 2
                mk = functools.partial(_variant_maker, v, inp, case, sms)
            check = name != "copy"
            row["results"][name] = measure(
                mk, inp, passes, modes, args.peak_gb_s, check, args.reps, args.iters
            )
        res["cases"].append(row)
        print_case(row, modes)
        del inp
        if not dry:
            torch.cuda.empty_cache()
    names = [b for b in baselines if b != "copy"] + [v.name for v in variants]
    res["totals"] = totals(res, calls, names, modes)
    res["elapsed_s"] = time.perf_counter() - t_start
    print_totals(
        res["totals"], modes, "kl-f8 decode (its norms at these shapes)" if args.vae else "UNet forward"
    )
    print(f"elapsed {res['elapsed_s']:.1f} s")
    return res


def print_case(row: dict[str, Any], modes: Sequence[str]) -> None:
    x_mb = math.prod(row["shape"]) * 2 / 1e6
    print(
        f"\n{row['case']} x{row['calls_per_step']}/step  shape {row['shape']}  x {x_mb:.1f} MB  "
        f"package: {row['package_path']}",
        flush=True,
    )
    head = "".join(f" {m + ' us':>9} {'GB/s':>6} {'%peak':>6}" for m in modes)
    print(f"  {'variant':<36} {'MB':>7}{head} {'max ulp':>8} {'ok':>3}")
    for name, r in row["results"].items():
        if "error" in r:
            print(f"  {name:<36} ERROR {r['error']}")
            continue
        cells = "".join(
            f" {r[m]['us']:9.1f} {r[m]['gb_s']:6.0f} {100 * r[m]['frac_peak']:5.1f}%" if m in r else " " * 23
            for m in modes
        )
        ulps = r.get("ulps")
        ok = "-" if ulps is None else ("y" if ulps["ok"] else "N")
        mx = "" if ulps is None else f"{ulps['max_ulps']:.2f}"
        gb = next((r[m]["gbytes"] for m in modes if m in r), math.nan)
        print(f"  {name:<36} {1e3 * gb:7.1f}{cells} {mx:>8} {ok:>3}", flush=True)


def totals(
    res: dict[str, Any], calls: Sequence[T.NormCall], names: Sequence[str], modes: Sequence[str]
) -> dict[str, Any]:
    """Per mode and name: ms summed over the UNet's norm calls (a variant not timed at a case, or failing
    its check there, counts the package's time), the cases it failed, and the per-case best of all."""
    by_case = {row["case"]: row for row in res["cases"]}
    out: dict[str, Any] = {}
    for mode in modes:
        per: dict[str, Any] = {}
        for name in names:
            total, fallbacks, failed = 0.0, 0, []
            for call in calls:
                row = by_case.get(call.case.key)
                if row is None:
                    continue
                r = row["results"].get(name)
                good = r is not None and mode in r and (name == "torch" or r.get("ulps", {"ok": True})["ok"])
                if not good:
                    if r is not None:
                        failed.append(row["case"])
                    pkg = row["results"].get("pkg", {})
                    if mode not in pkg:
                        total = math.nan
                        continue
                    total += pkg[mode]["ms"]
                    fallbacks += 1
                else:
                    total += r[mode]["ms"]
            per[name] = {"ms": total, "package_fallbacks": fallbacks, "failed_cases": sorted(set(failed))}
        best = 0.0
        for call in calls:
            row = by_case.get(call.case.key)
            if row is None:
                continue
            ok = [
                r[mode]["ms"]
                for n, r in row["results"].items()
                if n not in ("copy", "torch") and mode in r and r.get("ulps", {"ok": False})["ok"]
            ]
            best += min(ok) if ok else math.nan
        per["best_per_case"] = {"ms": best}
        copy_floor = sum(
            by_case[c.case.key]["results"]["copy"][mode]["ms"] * (1.5 if not _single(by_case, c) else 1.0)
            for c in calls
            if c.case.key in by_case and mode in by_case[c.case.key]["results"].get("copy", {})
        )
        per["copy_floor"] = {"ms": copy_floor}
        out[mode] = per
    return out


def _single(by_case: dict[str, Any], call: T.NormCall) -> bool:
    return bool(by_case[call.case.key]["package_path"] == "single")


def print_totals(tot: dict[str, Any], modes: Sequence[str], what: str = "UNet forward") -> None:
    for mode in modes:
        per = tot[mode]
        pkg = per.get("pkg", {}).get("ms", math.nan)
        old = per.get("old_pkg", {}).get("ms", math.nan)
        print(f"\nper {what}, sum over its GroupNorm calls [{mode}] (ms; vs pkg):")
        for name, r in sorted(per.items(), key=lambda kv: (math.isnan(kv[1]["ms"]), kv[1]["ms"])):
            extra = ""
            if r.get("failed_cases"):
                extra = f"  FAILED at {','.join(r['failed_cases'])} (package time counted)"
            print(f"  {name:<36} {r['ms']:8.3f}  {r['ms'] / pkg:6.3f}x{extra}")
        print(f"  new package / old package: {pkg / old:.3f}x ({old - pkg:+.3f} ms saved)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--batch", type=int, default=None, help="batch (default: UNet 16 = 8 images with guidance; --vae 1)"
    )
    p.add_argument("--vae", action="store_true", help="the kl-f8 decoder's norm shapes instead of the UNet's")
    p.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--modes", type=lambda s: s.split(","), default=["hot", "cold"], help="hot,cold")
    p.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=None,
        help="variant-name substrings and baseline names to run besides copy / old_pkg / pkg ('all': every "
        f"one; default: torch and {', '.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--all-cases", action="store_true", help="variants also where the package is single-pass")
    p.add_argument("--reps", type=int, default=10, help="calls per CUDA graph")
    p.add_argument("--iters", type=int, default=20, help="graph replays (median)")
    p.add_argument("--peak-gb-s", type=float, default=T.PEAK_GB_S)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.vae else 16
    if args.cpu_dry_run:
        args.batch = min(args.batch, 2)
    with torch.inference_mode():
        res = run(args)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()
