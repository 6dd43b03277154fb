"""The frozen CLIP ViT-L/14 text transformer of Stable Diffusion 1.x (CompVis ``FrozenCLIPEmbedder``).

Prompts are tokenized with OpenAI's CLIP BPE (77 tokens: ``<|startoftext|>`` ... ``<|endoftext|>``, padded
with ``<|endoftext|>`` as SD 1.x's tokenizer does, truncated) and encoded by the CLIP text transformer
(:class:`~ldm_sdk.encoders.clip_text_model.CLIPTextTransformer`, the computation of transformers'
``CLIPTextModel`` without its import cost); the output is the last hidden state ``[B, 77, 768]`` (causal
attention, no padding mask, final LayerNorm), exactly what SD 1.x's UNet cross-attends to.

Weights: an SD 1.x checkpoint holds them as ``cond_stage_model.transformer.text_model.*``; this module has
the same names under ``transformer.text_model``, so ``encoder.load_state_dict(bundle.cond_stage_weights)``
is strict. Files written with transformers < 4.31 also hold ``...embeddings.position_ids``; it is accepted
and ignored (positions are always ``0..76``: some merged checkpoints carry corrupted float copies), and
:meth:`compvis_state_dict` writes it back. A transformers folder (``openai/clip-vit-large-patch14`` saved
locally) loads with ``version=<folder>`` (read by transformers, then copied).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ldm_sdk.encoders.base import FrozenTextEncoder
from ldm_sdk.encoders.clip_text_model import CLIPTextTransformer
from ldm_sdk.encoders.tokenizers import (
    CLIP_VOCAB_SIZE,
    as_text_list,
    check_token_lengths,
    clean_clip_text,
    load_clip_tokenizer,
    tokenize_padded,
)

DEFAULT_VERSION = "openai/clip-vit-large-patch14"
#: OpenAI CLIP ViT-L/14's text tower (what SD 1.x uses), as a transformers ``CLIPTextConfig`` dict
VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
_ARCHITECTURE_NAMES = (DEFAULT_VERSION, "ViT-L/14")
_ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
)
_POSITION_IDS = "embeddings.position_ids"


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    """:class:`CLIPTextTransformer`'s arguments from a transformers ``CLIPTextConfig`` dict (it refuses an
    activation it does not have, naming the valid ones)."""
    return {name: config[name] for name in _ARCHITECTURE_KEYS if name in config}


class _TextModelHolder(nn.Module):
    """``transformer`` of ``FrozenCLIPEmbedder``: gives the text tower the name ``text_model``."""

    def __init__(self, text_model: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model


def _text_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` / ``encoder`` / ``final_layer_norm`` (transformers 4 or 5)."""
    inner = getattr(model, "text_model", None)
    return inner if isinstance(inner, nn.Module) else model


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """Frozen CLIP ViT-L/14 text encoder of Stable Diffusion 1.x: prompts -> ``[B, 77, 768]``.

    Args:
        version: ``"openai/clip-vit-large-patch14"`` (the CompVis default) builds the ViT-L/14 text
            architecture with random weights, to be replaced by the checkpoint's; a local transformers
            folder (or a hub id already in the local Hugging Face cache) loads config and weights from it
            (never downloads).
        max_length: tokens per prompt (77).
        tokenizer_path: a folder with CLIP's ``vocab.json`` + ``merges.txt`` (default: built from the
            ``open-clip-torch`` wheel into ``cache_dir``, see :mod:`ldm_sdk.encoders.tokenizers`).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: shrink the randomly
            initialised architecture (tests); only with the default ``version``.
    """

    compvis_targets: ClassVar[tuple[str, ...]] = ("ldm.modules.encoders.modules.FrozenCLIPEmbedder",)
    # built on the meta device for a checkpoint's weights: _after_load makes the position ids
    meta_init: ClassVar[bool] = True

    def __init__(
        self,
        version: str | os.PathLike[str] = DEFAULT_VERSION,
        max_length: int = 77,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        hidden_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
    ) -> None:
        super().__init__()
        overrides = {
            k: v
            for k, v in (
                ("hidden_size", hidden_size),
                ("num_hidden_layers", num_hidden_layers),
                ("num_attention_heads", num_attention_heads),
                ("intermediate_size", intermediate_size),
            )
            if v is not None
        }
        if str(version) in _ARCHITECTURE_NAMES:
            model = CLIPTextTransformer(**_architecture({**VIT_L14_TEXT, **overrides}))
        else:
            if overrides:
                raise ValueError(
                    f"architecture overrides {sorted(overrides)} apply only to version={DEFAULT_VERSION!r}; "
                    f"{str(version)!r} brings its own config"
                )
            with torch.device("cpu"):  # real weights even when built on meta: from_pretrained fills them
                model = self._load_pretrained(version)
        if not 1 <= max_length <= model.max_position_embeddings:
            raise ValueError(f"max_length must be in [1, {model.max_position_embeddings}], got {max_length}")
        self.version = str(version)
        self.max_length = max_length
        self.hidden_size = model.hidden_size
        self.tokenizer_path = tokenizer_path
        self.cache_dir = cache_dir
        self._tokenizer: Any = None
        self.transformer = _TextModelHolder(model)
        embeddings = self.transformer.text_model.embeddings
        embeddings.register_load_state_dict_pre_hook(_drop_file_position_ids)
        self.register_load_state_dict_post_hook(_after_load)
        self.freeze()

    @staticmethod
    def _load_pretrained(version: str | os.PathLike[str]) -> CLIPTextTransformer:
        """A transformers ``CLIPTextModel`` / ``CLIPModel`` folder (or a hub id in the local cache) read by
        transformers, its text tower copied into a :class:`CLIPTextTransformer` of the same config."""
        from transformers import CLIPTextModel

        path = Path(version).expanduser()
        try:
            loaded = CLIPTextModel.from_pretrained(
                str(path) if path.is_dir() else str(version), local_files_only=True
            )
        except OSError as exc:
            raise ValueError(
                f"cannot load a CLIP text model from {str(version)!r}: not a transformers folder and not "
                f"in the local Hugging Face cache (nothing is downloaded). Valid: a local folder, or "
                f"{DEFAULT_VERSION!r} to build the architecture and load weights from the checkpoint"
            ) from exc
        model = CLIPTextTransformer(**_architecture(loaded.config.to_dict()))
        weights = {k: v for k, v in _text_tower(loaded).state_dict().items() if not k.endswith(_POSITION_IDS)}
        model.load_state_dict(weights, strict=True)
        return model

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], **kwargs: Any) -> FrozenCLIPEmbedder:
        """Load config and weights from a transformers ``CLIPTextModel`` / ``CLIPModel`` folder, offline."""
        return cls(version=folder, **kwargs)

    # -- tokens ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """CLIP's BPE tokenizer (:func:`~ldm_sdk.encoders.tokenizers.load_clip_tokenizer`), loaded on first
        use."""
        if self._tokenizer is None:
            self._tokenizer = load_clip_tokenizer(self.tokenizer_path, cache_dir=self.cache_dir)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``[B, max_length]`` as OpenAI CLIP gives them, padded with ``<|endoftext|>``."""
        cleaned = [clean_clip_text(t) for t in as_text_list(texts)]
        return tokenize_padded(self.tokenizer, cleaned, self.max_length)[0]

    def check_length(self, texts: Sequence[str]) -> None:
        """Raise ValueError if a prompt has more than ``max_length`` tokens (start/end included)."""
        cleaned = [clean_clip_text(t) for t in as_text_list(texts)]
        check_token_lengths(self.tokenizer, cleaned, self.max_length, "CLIP ViT-L/14 text")

    # -- encoder ---------------------------------------------------------------------------------------
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids ``[B, T]`` -> ``last_hidden_state`` ``[B, T, hidden]`` (positions ``0..T-1``)."""
        text_model = self.transformer.text_model
        device = text_model.embeddings.token_embedding.weight.device
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
        return text_model(tokens, positions)  # type: ignore[no-any-return]

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> ``[B, max_length, hidden]``. Longer prompts are truncated, as in the original; call
        :meth:`check_length` first to refuse them."""
        return self.encode_tokens(self.tokenize(texts))

    def compvis_state_dict(self) -> dict[str, Tensor]:
        """This encoder's weights as an SD 1.x file holds them (``position_ids`` included)."""
        out = dict(self.state_dict())
        n = self.transformer.text_model.embeddings.position_embedding.weight.shape[0]
        out.setdefault(f"transformer.text_model.{_POSITION_IDS}", torch.arange(n)[None])
        return out


def _drop_file_position_ids(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """Pre-hook on the embeddings: a file's ``position_ids`` is ignored (kept only if it is a persistent
    buffer here, i.e. an old transformers, and then overwritten with ``0..n-1``)."""
    key = prefix + "position_ids"
    if key in state_dict:
        n = module.position_embedding.weight.shape[0]  # type: ignore[union-attr]
        if "position_ids" in module.state_dict():
            state_dict[key] = torch.arange(n)[None]
        else:
            del state_dict[key]


def _after_load(module: nn.Module, incompatible: Any) -> None:
    """Post-hook: a file without ``position_ids`` (newer transformers) loads strictly everywhere, and a
    module built on the meta device and loaded with ``assign=True`` gets real ``position_ids`` (the buffer
    is not in the file, so it would stay on meta and ``.to(device)`` would fail)."""
    missing: list[str] = incompatible.missing_keys
    for key in [k for k in missing if k.endswith(_POSITION_IDS)]:
        missing.remove(key)
    embeddings = module.transformer.text_model.embeddings  # type: ignore[union-attr]
    weight = embeddings.position_embedding.weight
    if embeddings.position_ids.is_meta and not weight.is_meta:
        embeddings.position_ids = torch.arange(weight.shape[0], device=weight.device)[None]


__all__ = ["DEFAULT_VERSION", "VIT_L14_TEXT", "FrozenCLIPEmbedder"]
