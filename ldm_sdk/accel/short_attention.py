"""Attention over a short key sequence -- a prompt's 77 tokens, an 8 x 8 map's 64 pixels -- as one Triton
kernel that holds all the keys of a head at once.

Why: the SD-1.5 UNet's cross-attentions attend from up to 4096 pixels to 77 context tokens. That is little
arithmetic (0.8 GFLOP at 64 x 64, batch 2) and little memory (the queries in, the output out), yet cuDNN's
attention took 13.8 us for it on an H100 (58 TFLOP/s), 8.2 and 8.8 us at 32 x 32 and 16 x 16, about 0.16 ms
of a 5.9 ms step with the 8 x 8 self-attention, each call also preceded by a workspace memset
(``bench/results/op_roofline_session5_b2_h100.json``, ``docs/performance-log.md``). With every key held at
once the softmax needs no running maximum: one program walks several tiles of ``BLOCK_M`` queries of one
(sample, head) with that head's keys and values loaded once (as one power-of-two block, or two: 77 keys as
64 + 16), forms each tile's scores with tensor-core products, exponentiates them in registers and multiplies
by the values -- one read of the queries, one write of the output. Per call on an H100 at batch 2:
9.9 us against cuDNN's 14.3 at 64 x 64, 5.7 against 8.6 at 32 x 32, 5.6 against 8.8 at 16 x 16
(``bench/bench_short_attention.py``).

Layouts: ``q`` ``(B, N, H * D)`` and ``k`` / ``v`` ``(B, M, H * D)`` as the projections give them (any row
strides, unit stride along the features: the ``split`` views of a stacked K / V projection are read in
place); the output is a new contiguous ``(B, N, H * D)`` tensor, heads merged, as
:meth:`~ldm_sdk.models.attention.CrossAttention.attention` returns it.

Numerics, as flash attention's: scores accumulated in float32 and scaled there, the row maximum subtracted,
``exp`` in float32, the probabilities rounded to the input dtype for the product with ``v`` (accumulated in
float32), the row sum taken in float32 from the unrounded values and divided out at the end, rounded once.
Tested against a float64 softmax attention, within the error of ``F.scaled_dot_product_attention``.

``backend="auto"`` runs the kernel for CUDA fp16 / bf16 inputs with at most :data:`MAX_KEYS` keys and
:data:`MAX_HEAD_DIM` features per head (:func:`fits_kernel`) where it measured faster than the library
(:func:`kernel_pays`) when Triton imports and no gradient is needed, else
``F.scaled_dot_product_attention``; ``"triton"`` always runs the kernel (errors say why it cannot),
``"reference"`` never does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_sdk.accel.triton_kernels import (
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _pow2,
    _use_triton,
    launch,
    triton,
)
from ldm_sdk.models.attention import multi_head_attention

MAX_KEYS = 128
"""Longest key sequence the kernel holds in one tile."""
MAX_HEAD_DIM = 256
"""Widest head the kernel takes (its keys, values and a query tile sit in shared memory: a 512-wide padded
head needs more than an H100 has; LDM cin256's single 192..960-wide heads mostly go to the library)."""
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
"""Input dtypes of the kernel (tensor-core products in half precision, as the library kernels)."""
TILING = {64: (64, 4, 4), 128: (64, 4, 4), 256: (32, 4, 2)}
"""Per padded head dim (40 -> 64, 80 -> 128, 160 -> 256): (queries per tile, warps, programs aimed for
per SM); a program walks several tiles with its head's keys and values loaded once. Chosen from
``bench/bench_short_attention.py`` (H100, SD-1.5 shapes at batch 2 and 16,
``bench/results/short_attention_h100.json``)."""
WIDE_HEAD_MAX_ROWS = 2048
"""Query rows (batch x queries) up to which the kernel takes heads wider than 64. H100, fp16, 77 keys, 8
heads (``bench/results/short_attention_h100.json``): head dim 80 at 2 x 1024 rows 5.7 us against cuDNN's
8.6, at 16 x 1024 40.7 against 28.5; head dim 160 at 2 x 256 rows 5.6 against 8.8, at 16 x 256 18.6
against 14.8, at 16 x 64 7.4 against 9.6. (Head dim 40 -- padded to 64 -- measured faster everywhere:
9.9 against 14.3 us at 2 x 4096 rows, 60.6 against 73.4 at 16 x 4096.) The kernel pads the keys to 80 and
the head dim to a power of two, so its tensor-core work and its ``exp`` count grow faster than cuDNN's."""


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
    auto = fits_kernel(q, k, v, heads) and kernel_pays(q, heads)
    if _use_triton(backend, "short_attention", q, k, v) and (backend == "triton" or auto):
        return short_attention_triton(q, k, v, heads, scale, recorder=recorder)
    return multi_head_attention(q, k, v, heads, scale)


def kernel_pays(q: Tensor, heads: int) -> bool:
    """Whether the kernel measured faster than the library attention for this query shape: head dims up to
    64 always; wider heads up to :data:`WIDE_HEAD_MAX_ROWS` query rows per head (see that constant)."""
    b, n, inner = q.shape
    return inner // heads <= 64 or b * n <= WIDE_HEAD_MAX_ROWS


def fits_kernel(q: Tensor, k: Tensor, v: Tensor, heads: int) -> bool:
    """Whether the kernel takes these projections: at most :data:`MAX_KEYS` keys and
    :data:`MAX_HEAD_DIM` features per head, one fp16 / bf16 dtype, unit stride along the features. (The
    device and autograd conditions are ``_use_triton``'s.)"""
    return (
        0 < k.shape[1] <= MAX_KEYS
        and q.shape[-1] // heads <= MAX_HEAD_DIM
        and q.dtype in ATTENTION_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )


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
    if d > MAX_HEAD_DIM:
        raise ValueError(
            f"the short-attention kernel takes heads of at most {MAX_HEAD_DIM} features, got {d}; use "
            "backend='auto' or 'reference'"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # "triton" forced
    out = torch.empty((b, n, inner), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    block_d = max(16, _pow2(d))
    first_keys, rest_keys = key_blocks(keys)
    block_m, warps, per_sm = TILING.get(block_d, (32, 4, 2))
    q_tiles = triton.cdiv(n, block_m)
    # each program walks several query tiles of its (sample, head) with the keys and values loaded once:
    # about per_sm programs per SM (re-reading them per tile cost more L2 traffic than the queries)
    target = per_sm * _sm_count(q.device)
    per_program = max(1, min(q_tiles, (q_tiles * b * heads) // max(1, target)))
    launch(
        _short_attention_kernel,
        (triton.cdiv(q_tiles, per_program), b * heads),
        recorder,
        q,
        k,
        v,
        out,
        n,
        keys,
        heads,
        per_program,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        float(scale),
        HEAD_DIM=d,
        BLOCK_M=block_m,
        BLOCK_K=first_keys,
        BLOCK_K2=rest_keys,
        BLOCK_D=block_d,
        num_warps=warps,
        # the tile loop's query loads double-buffered, but not beside 256-wide keys and values (shared
        # memory: Triton's default three stages need 240 KiB at head dim 160)
        num_stages=1 if block_d >= 256 else 2,
    )
    return out


def key_blocks(keys: int) -> tuple[int, int]:
    """The kernel's two key blocks (powers of two, at least 16; the second 0 when one suffices): the
    largest power of two not above ``keys``, then the rest rounded up -- 77 keys: (64, 16), 64: (64, 0),
    100: (64, 64), 5: (16, 0)."""
    first = max(16, _pow2(keys + 1) // 2)
    rest = keys - first
    return first, (max(16, _pow2(rest)) if rest > 0 else 0)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another


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
    from ldm_sdk.kernels.short_attention import (
        _short_attention_kernel,
    )


__all__ = [
    "ATTENTION_DTYPES",
    "MAX_HEAD_DIM",
    "MAX_KEYS",
    "fits_kernel",
    "kernel_pays",
    "short_attention",
    "short_attention_triton",
]
