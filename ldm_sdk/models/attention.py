"""Transformer attention of the latent diffusion UNet (CompVis ``ldm/modules/attention.py``).

Module and parameter names are those of CompVis / Stability-AI (``to_q``, ``to_out.0``, ``ff.net.0.proj``,
``transformer_blocks.0.attn2`` ...), so original checkpoints load with strict key matching. Attention is
computed with ``torch.nn.functional.scaled_dot_product_attention`` (same math as the original einsum softmax).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import checkpoint, zero_module

__all__ = [
    "GEGLU",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "SpatialTransformer",
]


def multi_head_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """``softmax(q k^T scale) v`` per head of ``(B, L, heads * D)`` projections, heads merged back:
    ``(B, N, heads * D)``, through ``F.scaled_dot_product_attention``."""
    b, n, inner = q.shape
    m, d = k.shape[1], inner // heads
    # (B, L, H*D) -> (B, H, L, D): the "b n (h d)" head split of the original.
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, m, heads, d).transpose(1, 2)
    v = v.view(b, m, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, n, inner)


def repeat_batch(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``x`` with its batch repeated ``repeats`` times, ``[x; x; ...]`` (the copies of classifier-free
    guidance), in ``x``'s memory format; ``x`` itself for one."""
    return x if repeats == 1 else torch.cat([x] * repeats)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D map stored that way (and not also contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (queries) over ``context`` (keys/values; ``x`` itself when None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(f"heads and dim_head must be >= 1, got heads={heads}, dim_head={dim_head}")
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, query_dim)``, ``context``: ``(B, M, context_dim)`` or None; returns like ``x``."""
        return self.attend(*self.project(x, context))

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q, k, v`` as ``(B, L, heads * dim_head)``: ``to_q(x)`` and ``to_k`` / ``to_v`` of the context
        (``x`` itself when None). A fast path may compute them another way (one GEMM); the rest is shared."""
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over the heads of projected ``q, k, v``, then ``to_out``."""
        return self.to_out(self.attention(q, k, v))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention over the heads of projected ``q, k, v``, heads merged back:
        ``(B, N, heads * dim_head)``, the input of ``to_out``."""
        return multi_head_attention(q, k, v, self.heads, self.scale)


class GEGLU(nn.Module):
    """Gated GELU: ``a * gelu(gate)`` where ``a, gate = proj(x).chunk(2)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` (GEGLU, or Linear + GELU), ``net.1`` dropout, ``net.2`` Linear."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in: nn.Module = (
            GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        )
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (``attn1``), cross-attention (``attn2``) and GEGLU feed-forward (``ff``).

    ``disable_self_attn`` (SD 2.x option) makes ``attn1`` attend to the context as well.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim,
            context_dim=context_dim if disable_self_attn else None,
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, repeats: int = 1) -> torch.Tensor:
        """``x``: ``(B, N, dim)``; ``context``: ``(B, M, context_dim)`` or None. With ``repeats`` > 1 the
        context holds ``repeats x B`` rows and the block computes what it would for ``x`` repeated as many
        times (:func:`repeat_batch`), the self-attention once (see :meth:`UNetModel.forward`)."""
        if repeats == 1:
            return checkpoint(self._forward, x, context, enabled=self.checkpoint and self.training)
        return self._forward(x, context, repeats)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, repeats: int = 1) -> torch.Tensor:
        if self.disable_self_attn:  # attn1 reads the context too: the copies part before it
            x, repeats = repeat_batch(x, repeats), 1
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = repeat_batch(x, repeats)
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, ``proj_in``, blocks, zero-initialised ``proj_out``.

    ``proj_in``/``proj_out`` are 1x1 convolutions, or Linear layers when ``use_linear`` (SD 2.x).
    ``context_dim`` is one width for every block or a list with one per block (``len == depth``).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | list[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"SpatialTransformer depth must be >= 1, got {depth}")
        if context_dim is None or isinstance(context_dim, int):
            context_dims: list[int | None] = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) != depth:
                raise ValueError(
                    f"context_dim list has {len(context_dims)} entries but depth is {depth}: "
                    "give one int, or one context width per transformer block"
                )
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dims[d],
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None, repeats: int = 1
    ) -> torch.Tensor:
        """``x``: ``(B, C, H, W)``; ``context``: ``(B, M, context_dim)``, a list (one per block), or None.
        With ``repeats`` > 1 the context holds ``repeats x B`` rows: the output is what ``x`` repeated as
        many times (:func:`repeat_batch`) would give, with the layers before the first block's
        cross-attention run once (see :meth:`UNetModel.forward`)."""
        contexts = context if isinstance(context, list) else [context]
        if len(contexts) not in (1, len(self.transformer_blocks)):
            raise ValueError(
                f"got {len(contexts)} contexts for {len(self.transformer_blocks)} transformer blocks: "
                "pass one context tensor, or a list with one per block"
            )
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()  # b c h w -> b (h w) c
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=contexts[i if len(contexts) > 1 else 0], repeats=repeats if i == 0 else 1)
        b = x.shape[0]
        if self.use_linear:
            x = self.proj_out(x)
        # b (h w) c -> b c h w, in x_in's memory format: for channels_last maps (the CUDA fast path) the
        # token layout already is NHWC, so no copy is made; NCHW maps are copied to NCHW as before
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=_memory_format(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + repeat_batch(x_in, repeats)
