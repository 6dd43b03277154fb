"""The first stage's spatial self-attention (``AttnBlock``) on the GPU fast path: one QKV GEMM over the pixel
rows, the attention as two batched GEMMs and a softmax, and ``proj_out``'s bias with the residual in one
kernel.

What: :class:`FusedAttnBlock` is the ``AttnBlock`` class :func:`~ldm_sdk.accel.block_fusion.fuse_blocks`
switches the autoencoder's attention blocks to (same Parameters; :func:`prepare_attn_block` first moves the
q / k / v weights, and their biases, back to back into one storage each). Its eval forward on a 4-D
channels_last input::

    h    = norm(x)                                   # the norm module as it is (e.g. a fused GroupNorm)
    rows = h as (B, H*W, C)                          # NHWC memory: a view, no copy
    q, k, v = linear(rows, W_qkv, b_qkv).split(C)    # one GEMM, bias in its epilogue
    a    = softmax_(baddbmm(q, k^T, alpha=C**-0.5)) v # C > 256 (softmax in place); else SDPA
    out  = bias_residual_add(linear(a, W_proj) as channels_last (B, C, H, W), proj_out.bias, x)
           # in a decoder: with the next norm's statistics (ldm_sdk.accel.norm_handoff)

Why: the kl-f8 decoder's mid block attends over 64 x 64 = 4096 tokens with one head of width C = 512.
``F.scaled_dot_product_attention`` has no flash or cuDNN kernel for a head dim above 256, so it runs
torch's memory-efficient kernel: 331 us on an H100 in fp16, where the same attention as ``baddbmm`` (fp16
scores, the scale in the GEMM) + ``softmax`` + ``bmm`` takes 109 us (206 us with float32 scores); the
softmax, 56 us of it in torch, is a Triton row kernel written over the scores
(:mod:`ldm_sdk.accel.row_softmax`). The three
q / k / v 1x1 convolutions take 11.8 us each; one GEMM over the NHWC pixel rows does all three in about
6-8 us. (``bench/results/op_roofline_h100.json``, key ``decode_b1``, from ``bench/op_roofline.py``.) The
whole block at that shape (fp16, channels_last, fused GroupNorm, CUDA-graph replay) went from 395 to
152-155 us on an H200 (one run each of the original and this forward, alternated twice).

Numerics: for C > 256 the scores are formed in the model dtype: the GEMM accumulates ``q k^T`` in float32,
scales it by ``C**-0.5`` (``alpha``) and rounds once to fp16 / bf16; the softmax accumulates in float32
and rounds its output once. That is what the original CompVis ``AttnBlock`` computes when run in half
precision (``torch.bmm(q, k)`` in the model dtype, then the scale, then the softmax) -- with one rounding
fewer, and with the scale applied before the rounding, so no overflow of unscaled scores in fp16. The
softmax kernel's probabilities are within one output ulp (plus float32 noise) of a float64 softmax of the
rounded scores. Against
a float32 evaluation the half-precision scores add about one fp16 rounding of the logits (relative 2**-11
of the logit size) to the probabilities; ``tests/accel/test_vae_attention.py`` bounds the whole block's
fp16 error against float32 and against the unfused fp16 block's. ``proj_out``'s bias and the residual are
added in float32 and rounded once (:func:`~ldm_sdk.accel.residual_kernels.bias_residual_add`). In float32
the fused block differs from the original by float32 evaluation order only. Queries run in chunks so that
the score and probability matrices together stay under :data:`SCORE_BUDGET_BYTES`. Each query row's result
depends on that row alone, so chunking does not change the maths; chunks are whole multiples of
:data:`CHUNK_ROW_MULTIPLE` rows (a GEMM tile height) where the budget allows, so that on the CPU's BLAS
each row is reduced in the same order as unchunked and the results are bit-identical (tested). cuBLAS may
choose another kernel for another row count; that changes float32 accumulation order only, far below the
fp16 rounding of the scores.

In training mode, for other layouts or dimensions, and under autocast, the original ``AttnBlock.forward``
runs.
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.conv_checks import plain_conv
from ldm_sdk.accel.norm_handoff import NormHandoff, residual_add_for_norm
from ldm_sdk.accel.row_softmax import softmax_
from ldm_sdk.accel.stacking import stack_storage, stacked_view
from ldm_sdk.accel.triton_kernels import Backend, KernelRecorder
from ldm_sdk.models import autoencoder

SCORE_BUDGET_BYTES = 256 * 2**20
"""Bytes the attention's score and probability matrices of one query chunk may take together (the GEMM
branch); 256 MiB holds one 64 x 64 map's 4096 x 4096 fp16 scores at batch 4 in one chunk."""
CHUNK_ROW_MULTIPLE = 64
"""Query rows a chunk holds a multiple of, where the budget allows one such multiple (see the module doc);
a budget below it is honoured with fewer rows (then results may differ by float evaluation order)."""
MAX_SDPA_HEAD_DIM = 256
"""Widest head that ``F.scaled_dot_product_attention`` has flash / cuDNN kernels for; wider heads take the
GEMM form."""


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _projections(block: autoencoder.AttnBlock) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    return block.q, block.k, block.v


def _plain_1x1(conv: nn.Module, channels: int) -> bool:
    """A 1x1 ``nn.Conv2d`` from ``channels`` to ``channels`` with a bias, stride 1, no padding, one group:
    a GEMM over the pixel rows."""
    c = cast(nn.Conv2d, conv)
    return plain_conv(conv, 1) and c.in_channels == c.out_channels == channels and c.bias is not None


def attn_block_fusable(block: autoencoder.AttnBlock) -> str | None:
    """Why ``block`` cannot take :class:`FusedAttnBlock`'s forward, or None when it can: ``q`` / ``k`` /
    ``v`` / ``proj_out`` must be plain 1x1 ``nn.Conv2d`` (C -> C, stride 1, no padding, one group) with a
    bias, all on one device in one dtype."""
    channels = block.in_channels
    convs = {"q": block.q, "k": block.k, "v": block.v, "proj_out": block.proj_out}
    for name, conv in convs.items():
        if not _plain_1x1(conv, channels):
            return (
                f"{name} is not a plain 1x1 nn.Conv2d ({channels} -> {channels} channels, stride 1, no "
                "padding, groups 1) with a bias"
            )
    tensors = [t for conv in convs.values() for t in (conv.weight, conv.bias)]
    if len({(t.device, t.dtype) for t in tensors}) != 1:
        return "q / k / v / proj_out weights and biases differ in device or dtype"
    return None


def prepare_attn_block(block: autoencoder.AttnBlock) -> None:
    """Move ``q`` / ``k`` / ``v``'s weights into one storage and their biases into another, back to back in
    that order, so :class:`FusedAttnBlock` reads them as one ``(3C, C)`` weight and one ``3C`` bias without a
    copy per call. Each Parameter stays itself (a view of the new storage): state dicts and in-place loading
    are unchanged. A no-op where they already lie that way.

    The stacked ``(C, C, 1, 1)`` weights get the strides ``module.to(memory_format=torch.channels_last)``
    gives (the element order of a 1x1 kernel is the same in both formats), so that call -- which
    ``prepare_cuda_inference`` makes -- leaves them in place, before or after this one; a later change to
    NCHW weights copies them apart (then the three projections run separately)."""
    reason = attn_block_fusable(block)
    if reason is not None:
        raise ValueError(f"prepare_attn_block: this AttnBlock cannot be fused: {reason}")
    convs = _projections(block)
    weights = [c.weight for c in convs]
    biases = [cast(Tensor, c.bias) for c in convs]
    if stacked_view(weights) is None:
        with torch.no_grad():
            for w in weights:  # the same element order; the strides .to(channels_last) keeps
                w.data = w.data.to(memory_format=torch.channels_last)
        stack_storage(weights)
    if stacked_view(biases) is None:
        stack_storage(biases)


class FusedAttnBlock(autoencoder.AttnBlock):
    """The first stage's ``AttnBlock`` with the fused eval forward of the module doc: one QKV GEMM over the
    channels_last pixel rows, the attention as GEMMs + softmax where the head is wider than 256 (SDPA
    otherwise), ``proj_out`` as a bias-free GEMM whose bias and the residual are added in one kernel. If the
    stacked q / k / v Parameters were given new storage since (``module.to(...)``, assignment), the three
    projections run as separate GEMMs. Training mode, inputs that are not 4-D channels_last and autocast take
    the original forward."""

    unfused_class: ClassVar[type[nn.Module]] = autoencoder.AttnBlock
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    norm_handoff: NormHandoff | None = None  # shared with the decoder's norms (block_fusion.link_decoder)
    feeds_norm: bool = False  # the output goes straight into a norm: offer its statistics

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.training
            or not _is_channels_last(x)
            or x.dtype != self.q.weight.dtype
            or torch.is_autocast_enabled(x.device.type)
        ):
            return autoencoder.AttnBlock.forward(self, x)
        b, c, height, width = x.shape
        h = self.norm(x)
        rows = h.permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view when h is channels_last
        q, k, v = self._qkv(rows)
        if c > MAX_SDPA_HEAD_DIM:
            attn = gemm_attention(q, k, v, backend=self.fusion_backend, recorder=self.kernel_recorder)
        else:
            attn = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        y = F.linear(attn, self.proj_out.weight.flatten(1))
        y = y.view(b, height, width, c).permute(0, 3, 1, 2)  # channels_last (B, C, H, W)
        handoff = self.norm_handoff if self.feeds_norm else None
        return residual_add_for_norm(
            y,
            self.proj_out.bias,
            x,
            handoff=handoff,
            backend=self.fusion_backend,
            recorder=self.kernel_recorder,
        )

    def _qkv(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, k, v)``, each ``(B, HW, C)``: one GEMM while the weights and biases are stacked (views of
        its output), else three."""
        convs = _projections(self)
        weight = stacked_view([conv.weight for conv in convs])
        bias = stacked_view([cast(Tensor, conv.bias) for conv in convs])
        if weight is not None and bias is not None:
            q, k, v = F.linear(rows, weight.flatten(1), bias).split(self.in_channels, dim=-1)
            return q, k, v
        q, k, v = (F.linear(rows, conv.weight.flatten(1), conv.bias) for conv in convs)
        return q, k, v


def gemm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    budget_bytes: int | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``softmax(q k^T / sqrt(C)) v`` for ``(B, L, C)`` ``q`` / ``k`` / ``v`` (any row strides, unit column
    stride) as ``baddbmm`` with the scale as ``alpha`` (scores in the input dtype, accumulated in float32
    and rounded once), the softmax over the last dim written over the scores
    (:func:`~ldm_sdk.accel.row_softmax.softmax_`: the Triton row kernel on CUDA, ``torch.softmax``
    elsewhere; ``backend`` picks) and ``bmm``; returns a contiguous ``(B, L, C)``. The
    queries run in chunks so that one chunk's scores and probabilities together take at most
    ``budget_bytes`` (default :data:`SCORE_BUDGET_BYTES`, read at call time; at least one query row per
    chunk), a multiple of :data:`CHUNK_ROW_MULTIPLE` rows where the budget allows."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"gemm_attention takes 3-D (B, L, C) q / k / v, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape != k.shape or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "gemm_attention needs q and k of one shape (B, L, C) and v of shape (B, L, C_v); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    budget = SCORE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    if budget <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget}")
    batch, length, channels = q.shape
    scale = channels**-0.5
    if length == 0:
        return torch.empty((batch, 0, v.shape[2]), device=q.device, dtype=q.dtype)
    key_t = k.transpose(1, 2)
    row_bytes = 2 * batch * length * q.element_size()  # one query row's scores + probabilities
    chunk = max(1, budget // max(1, row_bytes))
    if chunk < length and chunk >= CHUNK_ROW_MULTIPLE:
        chunk -= chunk % CHUNK_ROW_MULTIPLE  # whole GEMM tiles: the same per-row reduction as unchunked
    outputs = []
    for start in range(0, length, chunk):
        q_chunk = q[:, start : start + chunk]
        scores = torch.empty((batch, q_chunk.shape[1], length), device=q.device, dtype=q.dtype)
        scores = torch.baddbmm(scores, q_chunk, key_t, beta=0.0, alpha=scale)  # beta 0: input ignored
        outputs.append(torch.bmm(softmax_(scores, backend=backend, recorder=recorder), v))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


__all__ = [
    "CHUNK_ROW_MULTIPLE",
    "MAX_SDPA_HEAD_DIM",
    "SCORE_BUDGET_BYTES",
    "FusedAttnBlock",
    "attn_block_fusable",
    "gemm_attention",
    "prepare_attn_block",
]
