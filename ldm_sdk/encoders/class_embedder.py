"""Class labels -> one cross-attention token: CompVis ``ClassEmbedder``.

The class-conditional ImageNet LDMs (``cin256``, ``cin256-v2``) condition through cross-attention on a
single learned embedding per class: ``embedding(labels[:, None])`` -> ``[B, 1, embed_dim]``.

Classifier-free guidance needs an "unconditional" class the model was trained with: ``cin256-v2`` has
``n_classes=1001`` (its checkpoint's ``embedding.weight`` is ``[1001, 512]``) and uses index 1000 as the
null label (the CompVis ImageNet notebook passes ``1000`` as ``uc``); the original ``cin256`` has 1000
classes and no null label. That index is never guessed: pass ``uncond_class`` explicitly
(:meth:`ClassEmbedder.from_state_dict` builds one with the shape of a checkpoint's table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract


class ClassEmbedder(ConditionEncoder):
    """Class labels ``[B]`` -> ``[B, 1, embed_dim]`` learned embeddings (CompVis ``ClassEmbedder``).

    Parameter names: ``embedding.weight`` (``[n_classes, embed_dim]``), as under ``cond_stage_model.`` in
    an original checkpoint. ``key`` is the CompVis batch key (``"class_label"`` in the cin configs); it is
    kept for config round trips and does not change what :meth:`forward` takes.
    """

    modality: ClassVar[str] = "class"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = True
    compvis_targets: ClassVar[tuple[str, ...]] = ("ldm.modules.encoders.modules.ClassEmbedder",)

    def __init__(
        self, embed_dim: int, n_classes: int = 1000, key: str = "class", uncond_class: int | None = None
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or n_classes <= 0:
            raise ValueError(f"embed_dim and n_classes must be positive; got {embed_dim}, {n_classes}")
        if uncond_class is not None and not 0 <= uncond_class < n_classes:
            raise ValueError(
                f"uncond_class {uncond_class} is not a class of this embedder (valid: 0..{n_classes - 1}); "
                "a model trained with a null label has one extra class, e.g. n_classes=1001, "
                "uncond_class=1000"
            )
        self.key = key
        self.n_classes = n_classes
        self.embed_dim = embed_dim
        self.uncond_class = uncond_class
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], *, uncond_class: int | None = None, key: str = "class"
    ) -> ClassEmbedder:
        """An embedder shaped like ``state["embedding.weight"]``, with ``state`` loaded strictly."""
        if "embedding.weight" not in state:
            raise KeyError(f"no 'embedding.weight' in the state dict (keys: {sorted(state)[:8]})")
        n_classes, embed_dim = state["embedding.weight"].shape
        encoder = cls(int(embed_dim), int(n_classes), key=key, uncond_class=uncond_class)
        encoder.load_state_dict(dict(state), strict=True)
        return encoder

    @property
    def ucg_class(self) -> int | None:
        """Alias of :attr:`uncond_class` (the name later CompVis code uses for the null label)."""
        return self.uncond_class

    def contract(self) -> OutputContract:
        return OutputContract(kind="crossattn", channels=self.embed_dim, tokens=1)

    def _labels(self, labels: Tensor | Sequence[int]) -> Tensor:
        device = self.embedding.weight.device
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(list(labels), dtype=torch.long)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class labels must be an integer tensor; got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise ValueError(f"class labels must be a 1-d batch [B]; got shape {list(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            bad = sorted({int(v) for v in labels.tolist() if not 0 <= v < self.n_classes})
            raise ValueError(f"class labels {bad} out of range; valid labels are 0..{self.n_classes - 1}")
        return labels.to(device=device, dtype=torch.long)

    def forward(self, labels: Tensor | Sequence[int]) -> Tensor:
        """``labels``: LongTensor ``[B]`` (or a list of ints), ``0..n_classes-1`` -> ``[B, 1, embed_dim]``."""
        return self.embedding(self._labels(labels)[:, None])

    def unconditional(self, batch_size: int) -> Tensor:
        """The embedding of the null class, ``[batch_size, 1, embed_dim]``."""
        if self.uncond_class is None:
            raise ValueError(
                f"this class embedder ({self.n_classes} classes) has no unconditional class, so it cannot "
                "drive classifier-free guidance; models trained with a null label have one extra class "
                "(cin256-v2: n_classes=1001, uncond_class=1000) - pass uncond_class when building it"
            )
        return self.forward(torch.full((batch_size,), self.uncond_class, dtype=torch.long))


__all__ = ["ClassEmbedder"]
