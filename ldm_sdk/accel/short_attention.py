"""Attention over a short key sequence -- a prompt's 77 tokens, an 8 x 8 map's 64 pixels -- as one Triton
kernel that holds all the keys of a head at once.

Why: the SD-1.5 UNet's cross-attentions attend from up to 4096 pixels to 77 context tokens. That is little
arithmetic (0.8 GFLOP at 64 x 64, batch 2) and little memory (the queries in, the output out), yet cuDNN's
attention took 13.8 us for it on an H100 (58 TFLOP/s), 8.2 and 8.8 us at 32 x 32 and 16 x 16, about 0.16 ms
of a 5.9 ms step with the 8 x 8 self-attention, each call also preceded by a workspace memset
(``bench/results/op_roofline_session5_b2_h100.json``, ``docs/benchmarks.md``). With every key in one tile
the softmax needs no running maximum: one program takes ``BLOCK_M`` queries of one (sample, head), forms the
scores against all keys with one tensor-core product, exponentiates them in registers and multiplies by the
values -- one read of the queries, one write of the output.

Layouts: ``q`` ``(B, N, H * D)`` and ``k`` / ``v`` ``(B, M, H * D)`` as the projections give them (any row
strides, unit stride along the features: the ``split`` views of a stacked K / V projection are read in
place); the output is a new contiguous ``(B, N, H * D)`` tensor, heads merged, as
:meth:`~ldm_sdk.models.attention.CrossAttention.attention` returns it.

Numerics, as flash attention's: scores accumulated in float32 and scaled there, the row maximum subtracted,
``exp`` in float32, the probabilities rounded to the input dtype for the product with ``v`` (accumulated in
float32), the row sum taken in float32 from the unrounded values and divided out at the end, rounded once.
Tested against a float64 softmax attention, within the error of ``F.scaled_dot_product_attention``.

``backend="auto"`` runs the kernel for CUDA fp16 / bf16 inputs with at most :data:`MAX_KEYS` keys when
Triton imports and no gradient is needed, else ``F.scaled_dot_product_attention``; ``"triton"`` always
runs the kernel (errors say why it cannot), ``"reference"`` never does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel.triton_kernels import (
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _pow2,
    _use_triton,
    launch,
    tl,
    triton,
)

MAX_KEYS = 128
"""Longest key sequence the kernel holds in one tile."""
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
"""Input dtypes of the kernel (tensor-core products in half precision, as the library kernels)."""
BLOCK_M = 64
"""Queries per program."""
WIDE_WARPS = 8
"""Warps of a program whose padded head dim exceeds 64 (4 up to 64)."""


def short_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    scale: float,
    *,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``softmax(q k^T scale) v`` per head of ``(B, L, heads * D)`` projections, heads merged back:
    ``(B, N, heads * D)`` (see the module doc)."""
    _check_shapes(q, k, v, heads)
    if _use_triton(backend, "short_attention", q, k, v) and (backend == "triton" or fits_kernel(q, k, v)):
        return short_attention_triton(q, k, v, heads, scale, recorder=recorder)
    return attention_reference(q, k, v, heads, scale)


def fits_kernel(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the kernel takes these projections: at most :data:`MAX_KEYS` keys, one fp16 / bf16 dtype,
    unit stride along the features. (The device and autograd conditions are ``_use_triton``'s.)"""
    return (
        0 < k.shape[1] <= MAX_KEYS
        and q.dtype in ATTENTION_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )


def attention_reference(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """The same through ``F.scaled_dot_product_attention``, as
    :meth:`~ldm_sdk.models.attention.CrossAttention.attention` computes it."""
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    out = F.scaled_dot_product_attention(
        q.view(b, n, heads, d).transpose(1, 2),
        k.view(b, m, heads, d).transpose(1, 2),
        v.view(b, m, heads, d).transpose(1, 2),
        scale=scale,
    )
    return out.transpose(1, 2).reshape(b, n, inner)


def short_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, *, recorder: KernelRecorder | None = None
) -> Tensor:
    """:func:`short_attention` through the Triton kernel; at most :data:`MAX_KEYS` keys, fp16 / bf16."""
    _check_shapes(q, k, v, heads)
    if q.dtype not in ATTENTION_DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"the short-attention kernel takes fp16 / bf16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}; use backend='auto'"
        )
    for t in (q, k, v):
        _check_kernel_input(t, "short_attention")
    keys = k.shape[1]
    if not 0 < keys <= MAX_KEYS:
        raise ValueError(
            f"the short-attention kernel holds all keys in one tile: 1 to {MAX_KEYS}, got {keys}; use "
            "backend='auto' or 'reference'"
        )
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # "triton" forced
    out = torch.empty((b, n, inner), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    block_d = max(16, _pow2(d))
    grid = (triton.cdiv(n, BLOCK_M), b * heads)
    launch(
        _short_attention_kernel,
        grid,
        recorder,
        q,
        k,
        v,
        out,
        n,
        keys,
        heads,
        d,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        float(scale),
        BLOCK_M=BLOCK_M,
        BLOCK_K=max(16, _pow2(keys)),
        BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else WIDE_WARPS,
    )
    return out


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, heads: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            "short_attention takes q (B, N, H*D) and k, v of one shape (B, M, H*D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch and features (B, *, H*D)"
        )
    if heads < 1 or q.shape[2] % heads:
        raise ValueError(f"heads must divide the {q.shape[2]} features, got {heads}")


if triton is not None:

    @triton.jit(do_not_specialize=["N"])
    def _short_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        N,
        M,
        H,
        D,
        SQ_B,
        SQ_N,
        SK_B,
        SK_M,
        SV_B,
        SV_M,
        scale,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Queries ``[p BLOCK_M, (p + 1) BLOCK_M)`` of (sample, head) = program 1 against all ``M`` keys:
        ``S = q k^T scale`` (float32), ``P = exp(S - max)``, ``out = (P v) / sum P``."""
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        keys = tl.arange(0, BLOCK_K)
        d = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        key_ok = keys < M
        d_ok = d < D
        feat = h * D + d
        q = tl.load(
            q_ptr + b * SQ_B + rows[:, None].to(tl.int64) * SQ_N + feat[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * SK_B + keys[:, None] * SK_M + feat[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * SV_B + keys[:, None] * SV_M + feat[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        total = tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v)
        out = acc / total[:, None]
        inner = H * D
        tl.store(
            o_ptr + b * N * inner + rows[:, None].to(tl.int64) * inner + feat[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


__all__ = [
    "ATTENTION_DTYPES",
    "MAX_KEYS",
    "attention_reference",
    "fits_kernel",
    "short_attention",
    "short_attention_triton",
]
