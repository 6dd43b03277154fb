"""Layout (boxes + object classes) -> cross-attention tokens, as LDM's layout-to-image model does it.

``layout2img-openimages256`` conditions on ``coordinates_bbox``: a LongTensor of 92 tokens made by
taming-transformers' ``ObjectsBoundingBoxConditionalBuilder`` (30 objects x 3 tokens + 2 crop tokens,
``no_tokens=8192``, ``use_group_parameter``, ``encode_crop``), embedded by a ``BERTEmbedder`` with
``use_tokenizer: false`` (``n_embed 512, n_layer 16, vocab_size 8192, max_seq_len 92``): a trainable
x-transformers encoder straight on those tokens.

:class:`LayoutTokenizer` reproduces that builder:

- the image is a ``sections x sections`` grid, ``sections = isqrt(vocab_size)`` (90 for 8192); a point
  ``(x, y)`` in [0, 1] is the token ``round(y * (sections - 1)) * sections + round(x * (sections - 1))``
  (Python's ``round``: half to even, as the original);
- an object is the triple ``(class token, token(x0, y0), token(x1, y1))``; the class token is
  ``class_id + n_object_classes * group_of`` *without* an offset (class and coordinate tokens share one
  vocabulary; the position in the triple tells them apart);
- free object slots are ``(pad, pad, pad)`` with ``pad = vocab_size - 1``;
- with ``encode_crop`` two more tokens give the crop of the image the boxes refer to (the whole image,
  ``(0, 0, 1, 1)``, unless one is passed).

The builder shuffles objects during training, so their order carries no meaning; here they keep the
order given. Unlike the builder, which warns and truncates, too many objects is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract
from ldm_sdk.encoders.text_ldm_bert import TransformerWrapper

Box = tuple[float, float, float, float]
FULL_CROP: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class LayoutObject:
    """One object: ``class_id`` in ``0..n_object_classes-1``; ``box`` ``(x0, y0, x1, y1)`` relative to the
    image (0 = left / top, 1 = right / bottom); ``group_of``: the box holds a group of such objects."""

    class_id: int
    box: Box
    group_of: bool = False


class LayoutTokenizer:
    """Objects -> ``[seq_len]`` tokens, ``seq_len = 3 * max_objects (+ 2 with encode_crop)``, and back."""

    def __init__(
        self,
        n_object_classes: int,
        max_objects: int = 30,
        vocab_size: int = 8192,
        encode_crop: bool = True,
        use_group_parameter: bool = True,
    ) -> None:
        if n_object_classes < 1 or max_objects < 1:
            raise ValueError(
                f"n_object_classes and max_objects must be >= 1; got {n_object_classes}, {max_objects}"
            )
        self.n_object_classes = n_object_classes
        self.max_objects = max_objects
        self.vocab_size = vocab_size
        self.encode_crop = encode_crop
        self.use_group_parameter = use_group_parameter
        self.sections = math.isqrt(vocab_size)
        if self.sections < 2 or self.sections**2 > self.pad:
            raise ValueError(
                f"vocab_size {vocab_size} leaves no room for a {self.sections}x{self.sections} coordinate "
                f"grid below the padding token {vocab_size - 1}; use a vocab_size >= 5 that is not a "
                "perfect square"
            )
        n_class_tokens = n_object_classes * (2 if use_group_parameter else 1)
        if n_class_tokens > self.pad:
            raise ValueError(
                f"{n_class_tokens} class tokens (n_object_classes={n_object_classes}"
                f"{', x2 for group_of' if use_group_parameter else ''}) do not fit below the padding token "
                f"{self.pad}"
            )

    @property
    def pad(self) -> int:
        """The "no object" token (taming's ``none``)."""
        return self.vocab_size - 1

    @property
    def seq_len(self) -> int:
        return 3 * self.max_objects + (2 if self.encode_crop else 0)

    # -- coordinates -------------------------------------------------------------------------------
    def point_token(self, x: float, y: float) -> int:
        n = self.sections - 1
        return round(y * n) * self.sections + round(x * n)  # Python round: half to even, as taming

    def token_point(self, token: int) -> tuple[float, float]:
        if not 0 <= token < self.sections**2:
            raise ValueError(f"token {token} is not a coordinate token (valid: 0..{self.sections**2 - 1})")
        n = self.sections - 1
        return (token % self.sections) / n, (token // self.sections) / n

    def _check_box(self, box: Sequence[float], what: str) -> Box:
        if len(box) != 4:
            raise ValueError(f"{what}: a box is (x0, y0, x1, y1); got {tuple(box)}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise ValueError(
                f"{what}: box coordinates must lie in [0, 1] (relative to the image); got {tuple(box)}"
            )
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"{what}: a box needs x1 > x0 and y1 > y0 (positive area); got {tuple(box)}")
        return x0, y0, x1, y1

    # -- encode / decode ---------------------------------------------------------------------------
    def encode(self, objects: Sequence[LayoutObject], crop: Box | None = None) -> Tensor:
        """Objects (at most ``max_objects``) -> LongTensor ``[seq_len]``."""
        if len(objects) > self.max_objects:
            raise ValueError(
                f"{len(objects)} objects given; this layout model takes at most {self.max_objects} "
                f"(drop the smallest ones)"
            )
        tokens: list[int] = []
        for i, obj in enumerate(objects):
            if isinstance(obj.class_id, bool) or not 0 <= int(obj.class_id) < self.n_object_classes:
                raise ValueError(
                    f"object {i}: class_id {obj.class_id!r} out of range; "
                    f"valid: 0..{self.n_object_classes - 1}"
                )
            if obj.group_of and not self.use_group_parameter:
                raise ValueError(
                    f"object {i}: group_of is set but this tokenizer has use_group_parameter=False"
                )
            x0, y0, x1, y1 = self._check_box(obj.box, f"object {i}")
            rep = int(obj.class_id) + self.n_object_classes * int(bool(obj.group_of))
            tokens += [rep, self.point_token(x0, y0), self.point_token(x1, y1)]
        tokens += [self.pad] * (3 * (self.max_objects - len(objects)))
        if self.encode_crop:
            cx0, cy0, cx1, cy1 = self._check_box(crop if crop is not None else FULL_CROP, "crop")
            tokens += [self.point_token(cx0, cy0), self.point_token(cx1, cy1)]
        elif crop is not None:
            raise ValueError("a crop was given but this tokenizer has encode_crop=False")
        return torch.tensor(tokens, dtype=torch.long)

    def encode_batch(self, layouts: Sequence[Sequence[LayoutObject]]) -> Tensor:
        """A batch of layouts -> LongTensor ``[B, seq_len]``."""
        if not layouts:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        return torch.stack([self.encode(objs) for objs in layouts])

    def empty(self, batch_size: int = 1) -> Tensor:
        """Tokens of a layout without objects (all padding, full crop): ``[batch_size, seq_len]``."""
        return self.encode([]).expand(batch_size, -1).clone()

    def check_tokens(self, tokens: Tensor) -> Tensor:
        """Validate a ``[B, seq_len]`` (or ``[seq_len]``) token tensor; returns it as ``[B, seq_len]``."""
        if tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"layout tokens must be an integer tensor; got {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"layout tokens must be [B, {self.seq_len}]; got {list(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"layout tokens must lie in 0..{self.vocab_size - 1}")
        return tokens.long()

    def decode(self, tokens: Tensor) -> tuple[list[LayoutObject], Box | None]:
        """``[seq_len]`` tokens -> (objects with quantized boxes, crop box or None); padding slots dropped."""
        values = self.check_tokens(tokens)[0].tolist() if tokens.ndim == 1 else None
        if values is None:
            raise ValueError(f"decode takes one layout's tokens [{self.seq_len}]; got {list(tokens.shape)}")
        crop = None
        if self.encode_crop:
            crop = (*self.token_point(values[-2]), *self.token_point(values[-1]))
            values = values[:-2]
        objects = []
        for rep, t0, t1 in zip(values[0::3], values[1::3], values[2::3], strict=True):
            if rep == self.pad:
                continue
            box = (*self.token_point(t0), *self.token_point(t1))
            group = bool((rep // self.n_object_classes) & 1) and self.use_group_parameter
            objects.append(LayoutObject(rep % self.n_object_classes, box, group))
        return objects, crop


class LayoutEncoder(ConditionEncoder):
    """Layouts -> ``[B, max_seq_len, n_embed]``: :class:`LayoutTokenizer` + the LDM BERT transformer.

    The CompVis ``cond_stage_config`` is a ``BERTEmbedder`` with ``use_tokenizer: false``; its params
    (``n_embed, n_layer, vocab_size, max_seq_len, embedding_dropout``) are taken as they are, plus the
    tokenizer's (``n_object_classes`` - dataset-specific, required -, ``encode_crop``,
    ``use_group_parameter``); ``max_objects`` follows from ``max_seq_len``. Parameters:
    ``transformer.token_emb.weight``, ``transformer.pos_emb.emb.weight``, ``transformer.attn_layers...``,
    ``transformer.norm``, ``transformer.to_logits`` (see :mod:`ldm_sdk.encoders.text_ldm_bert`).

    :meth:`forward` takes a batch of layouts (``Sequence[Sequence[LayoutObject]]``) or the tokens
    ``[B, max_seq_len]`` (the original's ``coordinates_bbox`` batch key).

    Unconditional: the empty layout (every object slot padding, the full-image crop: what taming's builder
    makes of an image without annotations). The released layout2img model was not trained with condition
    dropout, so classifier-free guidance against it is an extrapolation rather than a learned "no layout";
    a model trained with layout dropout should drop to this same empty layout.
    """

    modality: ClassVar[str] = "layout"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = True
    compvis_targets: ClassVar[tuple[str, ...]] = ("ldm.modules.encoders.modules.BERTEmbedder",)

    def __init__(
        self,
        n_embed: int = 512,
        n_layer: int = 16,
        vocab_size: int = 8192,
        max_seq_len: int = 92,
        *,
        n_object_classes: int,
        encode_crop: bool = True,
        use_group_parameter: bool = True,
        embedding_dropout: float = 0.0,
        use_tokenizer: bool = False,
    ) -> None:
        super().__init__()
        if use_tokenizer:
            raise ValueError(
                "a layout BERTEmbedder reads layout tokens (use_tokenizer: false); with use_tokenizer: true "
                "it is the text encoder (ldm_sdk.encoders.text_ldm_bert.BERTEmbedder)"
            )
        slots = max_seq_len - (2 if encode_crop else 0)
        if slots < 3 or slots % 3:
            raise ValueError(
                f"max_seq_len {max_seq_len} is not 3 tokens per object"
                f"{' + 2 crop tokens' if encode_crop else ''} (layout2img: 30 objects -> 92)"
            )
        self.tokenizer = LayoutTokenizer(
            n_object_classes,
            slots // 3,
            vocab_size,
            encode_crop=encode_crop,
            use_group_parameter=use_group_parameter,
        )
        self.n_embed = n_embed
        self.max_seq_len = max_seq_len
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            dim=n_embed,
            depth=n_layer,
            emb_dropout=embedding_dropout,
        )

    def contract(self) -> OutputContract:
        return OutputContract(kind="crossattn", channels=self.n_embed, tokens=self.max_seq_len)

    def tokens(self, layouts: Sequence[Sequence[LayoutObject]] | Tensor) -> Tensor:
        """Token ids ``[B, max_seq_len]`` of a batch of layouts (tokens pass through, validated)."""
        if isinstance(layouts, Tensor):
            return self.tokenizer.check_tokens(layouts)
        return self.tokenizer.encode_batch(layouts)

    def forward(self, layouts: Sequence[Sequence[LayoutObject]] | Tensor) -> Tensor:
        tokens = self.tokens(layouts).to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens)

    def unconditional(self, batch_size: int) -> Tensor:
        """The encoding of the empty layout, ``[batch_size, max_seq_len, n_embed]``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.forward(self.tokenizer.empty(batch_size))


__all__ = ["FULL_CROP", "Box", "LayoutEncoder", "LayoutObject", "LayoutTokenizer"]
