"""Probe (a negative result, kept rerunnable): flash attention written in Triton's Gluon dialect for Hopper
against ``F.scaled_dot_product_attention`` (cuDNN's flash kernel on an H100), at the SD-1.5 UNet's long
self-attentions -- 4096 x 4096 with 40-wide heads (64 x 64 level), 1024 x 1024 with 80-wide heads
(32 x 32) -- 8 heads, batch 2 and 16.

Why: session 8's kernel in Triton's language (``bench/probe_flash_attention.py``) lost to cuDNN by 7 %;
Gluon gives what that language hides. :func:`attention`: the K / V tiles arrive by TMA into a ring of
shared-memory stages (one mbarrier each), ``q`` stays in registers, and the products are asynchronous
``wgmma``s issued by hand, so the softmax of key tile ``j`` runs while the tensor cores do tile ``j - 1``'s
``P V`` (FlashAttention-3's overlap within a warp group). As flags: the row sums of ``P`` on the tensor
cores (``P @ ones`` with the same fp16 ``P`` as the numerator; no float adds per score), the head dim split
into two power-of-two blocks (40 = 32 + 16: 48-wide products instead of 64), part of the exponentials by a
polynomial on the FMA pipes (FlashAttention-4's balance of the special-function units; relative error
5.6e-5, below fp16's rounding of ``P``). :func:`ws_attention`: FlashAttention-3's warp specialisation --
a producer warp streams the tiles, two consumer warp groups (240 registers a thread) share them, and
optionally take turns issuing their products (ping-pong) so one's softmax overlaps the other's products.

Result on an H100 (``bench/results/gluon_attention_h100.json``, Triton 3.6, each form in its own process with
cuDNN timed beside it): no form beats cuDNN by more than the noise. 4096 x 40, batch 2: the warp-specialized
form 154.3 us against cuDNN's 155.4 (ping-pong 156.9 / 155.1), the single-group kernel 156.8 / 154.9 (166.8
with the row sums as float adds), the split head dim 178.2, a quarter of the exponentials by polynomial 173.2,
half (with the split) 195.6. Batch 16: 1277.9 against 1262.8 (warp-specialized), 1345.3 (single group). 1024 x
80: every form loses (best 19.2 against 18.0 at batch 2, 145.5 against 112.5 at 16). Read from the compiled
code (``nvdisasm``): per 32 scores a thread of one group issues ~265 instructions, with tensor-core, special-
function and issue time in about equal shares (at a 64-wide head the exponentials alone take as long as the
products at the card's rates: 16 per clock and SM against 989 TFLOP/s); the kernels and cuDNN all land near
0.135 clocks per score and SM. Moving work off one of those (the split, the polynomial) lengthens another; a
second group, with or without ping-pong, overlaps no more than cuDNN already does.

    python bench/probe_gluon_attention.py --out bench/results/gluon_attention_h100.json
    # or one form per process (a kernel fault ends only its own run), rows merged into one file:
    for c in ws_2x128_n64_s4 m128_n64_s4 ...; do python bench/probe_gluon_attention.py --only $c --out F; done

Triton 3.6 (the GPU machine's) and 3.8 name the CTA barrier differently; both are handled.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sdk.models.attention import multi_head_attention

LOG2E = 1.4426950408889634
#: the CTA-wide barrier: ``thread_barrier`` in Triton 3.6, ``barrier`` from 3.7
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

#: (name, options) timed per shape; the first three were the session's first kernel's forms
CONFIGS: list[tuple[str, str, dict[str, int]]] = [
    ("m128_n64_s4_rowsum_fma", "plain", {"sum_mma": 0}),
    ("m128_n64_s4", "plain", {}),
    ("m128_n128_s3", "plain", {"bn": 128, "ns": 3}),
    ("m64_n64_s4_w4", "plain", {"bm": 64, "warps": 4}),
    ("m128_n64_s4_split", "plain", {"split": 1}),
    ("m64_n64_s4_w4_split", "plain", {"split": 1, "bm": 64, "warps": 4}),
    ("m128_n64_s4_split_poly25", "plain", {"split": 1, "poly": 1}),
    ("m128_n64_s4_split_poly50", "plain", {"split": 1, "poly": 2}),
    ("m128_n64_s4_poly25", "plain", {"poly": 1}),
    ("ws_2x128_n64_s4", "ws", {}),
    ("ws_2x128_n64_s4_pingpong", "ws", {"pingpong": 1}),
    ("ws_2x64_n128_s3", "ws", {"bmw": 64, "bn": 128, "ns": 3}),
    ("ws_2x64_n128_s3_pingpong", "ws", {"bmw": 64, "bn": 128, "ns": 3, "pingpong": 1}),
    ("ws_2x64_n64_s4", "ws", {"bmw": 64}),
]


@gluon.jit
def _exp2_poly(x):
    """2^x (x <= 0) on the FMA / integer pipes: x = j + f with j = round(x) (the 1.5 * 2^23 trick), 2^f on
    [-0.5, 0.5] by its degree-4 Taylor polynomial (relative error 5.6e-5), j added to the exponent bits."""
    x = gl.maximum(x, -126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.009618129107628477 * f + 0.0555041086648216
    p = p * f + 0.2402265069591007
    p = p * f + 0.6931471805599453
    p = p * f + 1.0
    j = t.to(gl.int32, bitcast=True) - 0x4B400000
    return (p.to(gl.int32, bitcast=True) + (j << 23)).to(gl.float32, bitcast=True)


@gluon.jit
def _exp2_mixed(x, POLY: gl.constexpr):
    """2^x with POLY quarters (0, 1, 2) of the columns by :func:`_exp2_poly`. A thread of the wgmma
    layout holds columns 8 k + (2 t, 2 t + 1): the split on the parity of k and then on the pair stays in
    registers."""
    if POLY == 0:
        return gl.exp2(x)
    else:
        BM: gl.constexpr = x.shape[0]
        BN: gl.constexpr = x.shape[1]
        xa, xb = gl.split(gl.permute(gl.reshape(x, [BM, BN // 16, 2, 8]), [0, 1, 3, 2]))
        if POLY == 2:
            eb = _exp2_poly(xb)
        else:
            xb0, xb1 = gl.split(gl.reshape(xb, [BM, BN // 16, 4, 2]))
            eb = gl.reshape(gl.join(gl.exp2(xb0), _exp2_poly(xb1)), [BM, BN // 16, 8])
            eb = gl.convert_layout(eb, xb.type.layout)
        e = gl.reshape(gl.permute(gl.join(gl.exp2(xa), eb), [0, 1, 3, 2]), [BM, BN])
        return gl.convert_layout(e, x.type.layout)


@gluon.jit
def _load_kv(
    ka,
    kb,
    va,
    vb,
    ka_s,
    kb_s,
    va_s,
    vb_s,
    bars,
    tile,
    n_tiles,
    row0,
    col,
    DA: gl.constexpr,
    DB: gl.constexpr,
    NS: gl.constexpr,
    BN: gl.constexpr,
):
    """TMA of key tile ``tile`` (its k and v blocks) into ring stage ``tile % NS``; none past the end."""
    st = tile % NS
    pred = tile < n_tiles
    bar = bars.index(st)
    if DB > 0:
        nbytes: gl.constexpr = (
            ka.block_type.nbytes + va.block_type.nbytes + kb.block_type.nbytes + vb.block_type.nbytes
        )
        mbarrier.expect(bar, nbytes, pred=pred)
    else:
        mbarrier.expect(bar, ka.block_type.nbytes + va.block_type.nbytes, pred=pred)
    row = row0 + tile * BN
    tma.async_copy_global_to_shared(ka, [row, col], bar, ka_s.index(st), pred=pred)
    tma.async_copy_global_to_shared(va, [row, col], bar, va_s.index(st), pred=pred)
    if DB > 0:
        tma.async_copy_global_to_shared(kb, [row, col + DA], bar, kb_s.index(st), pred=pred)
        tma.async_copy_global_to_shared(vb, [row, col + DA], bar, vb_s.index(st), pred=pred)


@gluon.jit
def _attention_kernel(
    q_desc,
    ka,
    kb,
    va,
    vb,
    o_ptr,
    L,
    H,
    o_row_stride,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BM: gl.constexpr,
    BN: gl.constexpr,
    DQ: gl.constexpr,
    DA: gl.constexpr,
    DB: gl.constexpr,
    NS: gl.constexpr,
    POLY: gl.constexpr,
    SUM_MMA: gl.constexpr,
    num_warps: gl.constexpr,
):
    """One program: BM queries of one (sample, head) over all L keys. q / k / v are rows of (B L, H D)
    through TMA descriptors; a tile's columns past the head's belong to the next head (or lie past the
    row: zero), so they are zeroed in q and their outputs never stored."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    col = (bh % H) * HEAD_DIM
    n_tiles = L // BN

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
    )
    oa_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, DA, 16]
    )
    DBW: gl.constexpr = max(DB, 8)
    ob_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, DBW, 16]
    )
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8, 16]
    )
    q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    pa_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=oa_layout, k_width=2)
    pb_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ob_layout, k_width=2)
    pl_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BN], gl.float16)

    q_smem = gl.allocate_shared_memory(gl.float16, [BM, DQ], q_desc.layout)
    ka_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DA], ka.layout)
    va_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DA], va.layout)
    if DB > 0:
        kb_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DB], kb.layout)
        vb_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DB], vb.layout)
    else:
        kb_s = ka_s
        vb_s = va_s
    bars = gl.allocate_shared_memory(gl.int64, [NS + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS + 1):
        mbarrier.init(bars.index(i), count=1)
    # the ones operand stored k-major, as k is ([8, BN], used transposed)
    ones_smem = gl.allocate_shared_memory(gl.float16, [8, BN], ones_layout)
    if SUM_MMA:
        ones_smem.store(gl.full([8, BN], 1.0, gl.float16, layout=blk))
        fence_async_shared()

    q_bar = bars.index(NS)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b * L + pid_m * BM, col], q_bar, q_smem)
    for i in gl.static_range(NS - 1):
        _load_kv(ka, kb, va, vb, ka_s, kb_s, va_s, vb_s, bars, i, n_tiles, b * L, col, DA, DB, NS, BN)
    cta_barrier()

    mbarrier.wait(q_bar, 0)
    qa = q_smem.slice(0, DA, dim=1).load(blk)
    ca = gl.arange(0, DA, layout=gl.SliceLayout(0, blk))
    qa = gl.convert_layout(gl.where((ca < HEAD_DIM)[None, :], qa, gl.zeros_like(qa)), q_op)
    if DB > 0:
        qb = q_smem.slice(DA, DB, dim=1).load(blk)
        cb = DA + gl.arange(0, DB, layout=gl.SliceLayout(0, blk))
        qb = gl.convert_layout(gl.where((cb < HEAD_DIM)[None, :], qb, gl.zeros_like(qb)), q_op)
    else:
        qb = qa

    s_zero = gl.zeros([BM, BN], gl.float32, layout=s_layout)
    mbarrier.wait(bars.index(0), 0)
    s = warpgroup_mma(qa, ka_s.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if DB > 0:
        s = warpgroup_mma(qb, kb_s.index(0).permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    m_i = gl.max(s, 1) * qk_scale
    p = _exp2_mixed(s * qk_scale - m_i[:, None], POLY)
    l_i = gl.sum(p, 1)  # used without SUM_MMA
    p16 = p.to(gl.float16)
    acc_a = gl.zeros([BM, DA], gl.float32, layout=oa_layout)
    acc_b = gl.zeros([BM, DBW], gl.float32, layout=ob_layout)
    l_acc = gl.zeros([BM, 8], gl.float32, layout=l_layout)

    for j in range(1, n_tiles):
        cta_barrier()  # every warp group is done with tile j - 2 (its P V was waited for last iteration)
        _load_kv(
            ka, kb, va, vb, ka_s, kb_s, va_s, vb_s, bars, j + NS - 2, n_tiles, b * L, col, DA, DB, NS, BN
        )
        st = j % NS
        pv = (j - 1) % NS
        mbarrier.wait(bars.index(st), (j // NS) & 1)
        # in flight together: S_j = q k_j^T, then P_{j-1} v_{j-1} (and P_{j-1} @ ones); the softmax of S_j
        # runs while the latter are on the tensor cores
        s_tok = warpgroup_mma(qa, ka_s.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if DB > 0:
            s_tok = warpgroup_mma(qb, kb_s.index(st).permute((1, 0)), s_tok, is_async=True)
        a_tok = warpgroup_mma(gl.convert_layout(p16, pa_op), va_s.index(pv), acc_a, is_async=True)
        if DB > 0:
            b_tok = warpgroup_mma(gl.convert_layout(p16, pb_op), vb_s.index(pv), acc_b, is_async=True)
        if SUM_MMA:
            l_tok = warpgroup_mma(
                gl.convert_layout(p16, pl_op), ones_smem.permute((1, 0)), l_acc, is_async=True
            )
        if DB > 0 and SUM_MMA:
            s = warpgroup_mma_wait(3, deps=(s_tok,))
        elif DB > 0 or SUM_MMA:
            s = warpgroup_mma_wait(2, deps=(s_tok,))
        else:
            s = warpgroup_mma_wait(1, deps=(s_tok,))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = _exp2_mixed(s * qk_scale - m_new[:, None], POLY)
        if not SUM_MMA:
            l_i = l_i * alpha + gl.sum(p, 1)
        p16 = p.to(gl.float16)
        m_i = m_new
        acc_a = warpgroup_mma_wait(0, deps=(a_tok,))
        acc_a = acc_a * gl.convert_layout(alpha, gl.SliceLayout(1, oa_layout))[:, None]
        if DB > 0:
            acc_b = warpgroup_mma_wait(0, deps=(b_tok,))
            acc_b = acc_b * gl.convert_layout(alpha, gl.SliceLayout(1, ob_layout))[:, None]
        if SUM_MMA:
            l_acc = warpgroup_mma_wait(0, deps=(l_tok,))
            l_acc = l_acc * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]

    pv = (n_tiles - 1) % NS
    acc_a = warpgroup_mma(gl.convert_layout(p16, pa_op), va_s.index(pv), acc_a)
    if DB > 0:
        acc_b = warpgroup_mma(gl.convert_layout(p16, pb_op), vb_s.index(pv), acc_b)
    if SUM_MMA:
        l_acc = warpgroup_mma(gl.convert_layout(p16, pl_op), ones_smem.permute((1, 0)), l_acc)
        l_i = gl.convert_layout(gl.max(l_acc, 1), gl.SliceLayout(1, s_layout))
    for i in gl.static_range(NS + 1):
        mbarrier.invalidate(bars.index(i))

    rows = b * L + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, oa_layout))
    cols = gl.arange(0, DA, layout=gl.SliceLayout(0, oa_layout))
    out = acc_a / gl.convert_layout(l_i, gl.SliceLayout(1, oa_layout))[:, None]
    ptrs = o_ptr + rows[:, None].to(gl.int64) * o_row_stride + col + cols[None, :]
    gl.store(ptrs, out.to(gl.float16), mask=(cols < HEAD_DIM)[None, :])
    if DB > 0:
        rows = b * L + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, ob_layout))
        cols = DA + gl.arange(0, DBW, layout=gl.SliceLayout(0, ob_layout))
        out = acc_b / gl.convert_layout(l_i, gl.SliceLayout(1, ob_layout))[:, None]
        ptrs = o_ptr + rows[:, None].to(gl.int64) * o_row_stride + col + cols[None, :]
        gl.store(ptrs, out.to(gl.float16), mask=(cols < HEAD_DIM)[None, :])


def head_blocks(d: int, split: bool) -> tuple[int, int, int]:
    """(DQ, DA, DB): the q tile's width (d up to a power of two, at least 16) and the k / v blocks -- one
    of DQ, or with ``split`` two powers of two that cover d with less padding (40 -> 32 + 16, 80 -> 64 +
    16); DB 0 for one block."""
    dq = max(16, 1 << (d - 1).bit_length())
    if not split or dq == d:
        return dq, dq, 0
    da = dq // 2
    return dq, da, max(16, 1 << (d - da - 1).bit_length())


def launch_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bm: int, bn: int, split: bool
) -> tuple[list[TensorDescriptor], tuple[int, int, int]]:
    """The five TMA descriptors (q; k and v in their one or two blocks) over ``(B, L, heads * D)`` rows,
    and :func:`head_blocks`."""
    b, n, inner = q.shape
    dq, da, db = head_blocks(inner // heads, split)

    def desc(x: torch.Tensor, block: int, width: int) -> TensorDescriptor:
        if x.stride(2) != 1 or x.stride(0) != n * x.stride(1):
            raise ValueError(f"(B, L, H*D) rows must be evenly strided with unit columns, got {x.stride()}")
        layout = gl.NVMMASharedLayout.get_default_for([block, width], gl.float16)
        return TensorDescriptor(x, [b * n, inner], [x.stride(1), 1], [block, width], layout)

    ka, va = desc(k, bn, da), desc(v, bn, da)
    kb, vb = (desc(k, bn, db), desc(v, bn, db)) if db else (ka, va)
    return [desc(q, bm, dq), ka, kb, va, vb], (dq, da, db)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    *,
    bm: int = 128,
    bn: int = 64,
    ns: int = 4,
    warps: int = 8,
    split: int = 0,
    poly: int = 0,
    sum_mma: int = 1,
    grid_only: bool = False,
) -> Any:
    """``softmax(q k^T scale) v`` per head of fp16 ``(B, L, heads * D)`` self-attention projections (L a
    multiple of ``bm`` and ``bn``); ``grid_only``: the launch's arguments, for a compile without a GPU."""
    b, n, inner = q.shape
    if n % bm or n % bn or k.shape[1] != n or poly not in (0, 1, 2) or ns < 3:
        raise ValueError(
            f"needs self-attention with L a multiple of {bm} and {bn} (got {n} queries, {k.shape[1]} keys), "
            f"poly in 0/1/2 (got {poly}) and at least 3 stages (got {ns})"
        )
    descs, (dq, da, db) = launch_args(q, k, v, heads, bm, bn, bool(split))
    out = torch.empty(b, n, inner, device=q.device, dtype=q.dtype)
    args = (*descs, out, n, heads, inner, scale * LOG2E)
    meta = dict(HEAD_DIM=inner // heads, BM=bm, BN=bn, DQ=dq, DA=da, DB=db, NS=ns, POLY=poly)
    meta.update(SUM_MMA=bool(sum_mma), num_warps=warps)
    if grid_only:
        return args, meta, (n // bm, b * heads)
    _attention_kernel[(n // bm, b * heads)](*args, **meta)
    return out


@gluon.jit
def _ws_consume(
    wg,
    q_desc,
    kd,
    vd,
    o_ptr,
    L,
    o_row_stride,
    qk_scale,
    q_s,
    k_s,
    v_s,
    ones_s,
    ready,
    empty,
    qbar,
    turn,
    b,
    col,
    q_row0,
    HEAD_DIM,
):
    """Consumer warp group ``wg`` (0: the default partition, 1: a worker; a run-time index, as the
    partitions' arguments carry no constexprs): its BMW query rows over every key tile of the ring;
    releases a stage (``empty``, one arrival of two) once its ``P v`` is done. With ping-pong (``turn``
    has two barriers) the two groups take turns issuing their products."""
    # constexprs do not pass through warp_specialize's arguments in Triton 3.6: read them off the buffers
    NS: gl.constexpr = k_s.type.shape[0]
    BN: gl.constexpr = k_s.type.shape[1]
    BMW: gl.constexpr = q_s.type.shape[1]
    DQ: gl.constexpr = q_s.type.shape[2]
    PINGPONG: gl.constexpr = turn.type.shape[0] == 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DQ, 16]
    )
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 16]
    )
    q_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    pl_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])

    q_smem = q_s.index(wg)
    qb = qbar.index(wg)
    mbarrier.expect(qb, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0 + wg * BMW, col], qb, q_smem)
    mbarrier.wait(qb, 0)
    qr = q_smem.load(blk)
    cq = gl.arange(0, DQ, layout=gl.SliceLayout(0, blk))
    q = gl.convert_layout(gl.where((cq < HEAD_DIM)[None, :], qr, gl.zeros_like(qr)), q_op)
    ones = ones_s.permute((1, 0))

    n_tiles = L // BN
    s_zero = gl.zeros([BMW, BN], gl.float32, layout=s_layout)
    mbarrier.wait(ready.index(0), 0)
    s = warpgroup_mma(q, k_s.index(0).permute((1, 0)), s_zero, use_acc=False)
    m_i = gl.max(s, 1) * qk_scale
    p16 = gl.exp2(s * qk_scale - m_i[:, None]).to(gl.float16)
    acc = gl.zeros([BMW, DQ], gl.float32, layout=o_layout)
    l_acc = gl.zeros([BMW, 8], gl.float32, layout=l_layout)
    for j in range(1, n_tiles):
        st = j % NS
        pv = (j - 1) % NS
        mbarrier.wait(ready.index(st), (j // NS) & 1)
        if PINGPONG:
            mbarrier.wait(turn.index(wg), (j - 1) & 1)
        s_tok = warpgroup_mma(q, k_s.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        a_tok = warpgroup_mma(gl.convert_layout(p16, p_op), v_s.index(pv), acc, is_async=True)
        l_tok = warpgroup_mma(gl.convert_layout(p16, pl_op), ones, l_acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - wg), count=1)
        s = warpgroup_mma_wait(2, deps=(s_tok,))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p16 = gl.exp2(s * qk_scale - m_new[:, None]).to(gl.float16)
        m_i = m_new
        acc, l_acc = warpgroup_mma_wait(0, deps=(a_tok, l_tok))
        mbarrier.arrive(empty.index(pv), count=1)  # tile j - 1's k and v are consumed
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        l_acc = l_acc * gl.convert_layout(alpha, gl.SliceLayout(1, l_layout))[:, None]
    pv = (n_tiles - 1) % NS
    acc = warpgroup_mma(gl.convert_layout(p16, p_op), v_s.index(pv), acc)
    l_acc = warpgroup_mma(gl.convert_layout(p16, pl_op), ones, l_acc)

    rows = q_row0 + wg * BMW + gl.arange(0, BMW, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, DQ, layout=gl.SliceLayout(0, o_layout))
    out = acc / gl.convert_layout(gl.max(l_acc, 1), gl.SliceLayout(1, o_layout))[:, None]
    ptrs = o_ptr + rows[:, None].to(gl.int64) * o_row_stride + col + cols[None, :]
    gl.store(ptrs, out.to(gl.float16), mask=(cols < HEAD_DIM)[None, :])


@gluon.jit
def _ws_producer(
    wg,
    q_desc,
    kd,
    vd,
    o_ptr,
    L,
    o_row_stride,
    qk_scale,
    q_s,
    k_s,
    v_s,
    ones_s,
    ready,
    empty,
    qbar,
    turn,
    b,
    col,
    q_row0,
    HEAD_DIM,
):
    """One warp: every key tile's k and v by TMA into the ring, a stage once both consumers released it.
    Its parameters are :func:`_ws_consume`'s: the worker partitions of ``gl.warp_specialize`` share one
    signature (the consumer group 1 is a worker too)."""
    NS: gl.constexpr = k_s.type.shape[0]
    BN: gl.constexpr = k_s.type.shape[1]
    for t in range(L // BN):
        st = t % NS
        mbarrier.wait(empty.index(st), ((t // NS) & 1) ^ 1)  # a fresh barrier passes the first round
        bar = ready.index(st)
        mbarrier.expect(bar, kd.block_type.nbytes + vd.block_type.nbytes)
        tma.async_copy_global_to_shared(kd, [b * L + t * BN, col], bar, k_s.index(st))
        tma.async_copy_global_to_shared(vd, [b * L + t * BN, col], bar, v_s.index(st))


@gluon.jit
def _ws_attention_kernel(
    q_desc,
    kd,
    vd,
    o_ptr,
    L,
    H,
    o_row_stride,
    qk_scale,
    HEAD_DIM: gl.constexpr,
    BMW: gl.constexpr,
    BN: gl.constexpr,
    DQ: gl.constexpr,
    NS: gl.constexpr,
    PINGPONG: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Warp-specialized form: a producer warp and two consumer warp groups (the default partition and a
    worker), 2 BMW query rows of one (sample, head) per program."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    col = (bh % H) * HEAD_DIM
    q_row0 = b * L + pid_m * 2 * BMW
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BN], gl.float16)

    q_s = gl.allocate_shared_memory(gl.float16, [2, BMW, DQ], q_desc.layout)
    k_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DQ], kd.layout)
    v_s = gl.allocate_shared_memory(gl.float16, [NS, BN, DQ], vd.layout)
    ones_s = gl.allocate_shared_memory(gl.float16, [8, BN], ones_layout)
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    qbar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2 if PINGPONG else 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    mbarrier.init(qbar.index(0), count=1)
    mbarrier.init(qbar.index(1), count=1)
    mbarrier.init(turn.index(0), count=1)
    if PINGPONG:
        mbarrier.init(turn.index(1), count=1)
    ones_s.store(gl.full([8, BN], 1.0, gl.float16, layout=blk))
    fence_async_shared()
    if PINGPONG:
        mbarrier.arrive(turn.index(0), count=1)  # group 0 issues first

    # the same arguments for each partition but the consumer index (tuples are written out: no unpacking
    # inside a JIT function)
    group0 = (
        0,
        q_desc,
        kd,
        vd,
        o_ptr,
        L,
        o_row_stride,
        qk_scale,
        q_s,
        k_s,
        v_s,
        ones_s,
        ready,
        empty,
        qbar,
        turn,
        b,
        col,
        q_row0,
        HEAD_DIM,
    )
    group1 = (
        1,
        q_desc,
        kd,
        vd,
        o_ptr,
        L,
        o_row_stride,
        qk_scale,
        q_s,
        k_s,
        v_s,
        ones_s,
        ready,
        empty,
        qbar,
        turn,
        b,
        col,
        q_row0,
        HEAD_DIM,
    )
    gl.warp_specialize(
        [(_ws_consume, group0), (_ws_consume, group1), (_ws_producer, group0)], [4, 1], [CONSUMER_REGS, 24]
    )


def ws_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float,
    *,
    bmw: int = 128,
    bn: int = 64,
    ns: int = 4,
    pingpong: int = 0,
    grid_only: bool = False,
) -> Any:
    """The warp-specialized form of :func:`attention` (head dim padded to a power of two, row sums on the
    tensor cores); L a multiple of ``2 bmw`` and ``bn``."""
    b, n, inner = q.shape
    if n % (2 * bmw) or n % bn or k.shape[1] != n or ns < 2:
        raise ValueError(
            f"needs self-attention with L a multiple of {2 * bmw} and {bn} (got {n} queries, {k.shape[1]} "
            f"keys) and at least 2 stages (got {ns})"
        )
    descs, (dq, _, _) = launch_args(q, k, v, heads, bmw, bn, False)
    out = torch.empty(b, n, inner, device=q.device, dtype=q.dtype)
    args = (descs[0], descs[1], descs[3], out, n, heads, inner, scale * LOG2E)
    # 4 + 4 + 1 warps are allocated as three warp groups: 168 registers a thread at launch, moved to the
    # consumers (240) from the producer (24)
    meta = dict(HEAD_DIM=inner // heads, BMW=bmw, BN=bn, DQ=dq, NS=ns, PINGPONG=bool(pingpong))
    meta.update(CONSUMER_REGS=240, num_warps=4, maxnreg=168)
    grid = (n // (2 * bmw), b * heads)
    if grid_only:
        return args, meta, grid
    _ws_attention_kernel[grid](*args, **meta)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x40,1024x80", help="tokens x head dim, comma-separated")
    p.add_argument("--batches", default="2,16")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated config names (cuDNN is timed beside them, recorded as each one's sdpa_us); "
        "default all",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON to write; rows already there are kept and updated"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this probe needs a CUDA device")
    import triton
    from op_roofline import graph_us

    res: dict[str, Any] = {}
    if args.out and args.out.exists():
        res = json.loads(args.out.read_text())
    res.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    only = {name for name in args.only.split(",") if name}
    g = torch.Generator("cuda").manual_seed(0)
    for n, d in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            heads = 8
            qkv = torch.randn(batch, n, 3 * heads * d, generator=g, device="cuda").half()
            q, k, v = qkv.split(heads * d, dim=-1)
            scale = d**-0.5
            ref = multi_head_attention(q.float(), k.float(), v.float(), heads, scale)
            peak = ref.abs().max().item()
            forms = {"sdpa": functools.partial(multi_head_attention, q, k, v, heads, scale)}
            for name, kind, opts in CONFIGS:
                if only and name not in only:
                    continue
                fn = ws_attention if kind == "ws" else attention
                forms[name] = functools.partial(fn, q, k, v, heads, scale, **opts)
            row: dict[str, Any] = res.setdefault(f"b{batch}_n{n}_d{d}", {})
            timed: dict[str, Any] = {}
            for name, fn in forms.items():
                try:
                    err = (fn().float() - ref).abs().max().item() / peak
                except triton.runtime.errors.OutOfResources as exc:  # e.g. a tile plan too big at d = 80
                    print(batch, n, d, name, "does not fit:", exc, flush=True)
                    continue
                timed[name] = {"us": round(graph_us(fn, 20, 30), 2), "rel_err": float(f"{err:.3g}")}
            for name, entry in timed.items():
                if name != "sdpa":  # each form beside cuDNN as timed in the same process
                    entry["sdpa_us"] = timed["sdpa"]["us"]
                row[name] = entry
                print(batch, n, d, name, entry, flush=True)
            if args.out:
                args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
