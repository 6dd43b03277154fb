"""The condition-encoder contract every encoder plugin implements.

An encoder turns one modality (text, class labels, a semantic map, a low-res image, a mask, a layout) into
the tensor the UNet is conditioned with, and declares how that tensor enters the network:

- ``crossattn``: a token sequence ``[B, tokens, channels]`` read by the SpatialTransformers (``context``);
- ``concat``: a map ``[B, channels, H / f, W / f]`` concatenated to the latent (``f`` = ``latent_factor``
  relative to the IMAGE, so it equals the first stage's factor when the map sits at latent resolution);
- ``adm``: a vector ``[B, channels]`` added to the time embedding (``y``).

Parameter names follow the CompVis ``cond_stage_model`` where the original had weights, so
``encoder.load_state_dict(bundle.cond_stage_weights)`` works on an original checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Self

from torch import Tensor, nn

from ldm_sdk.diffusion.conditioning import Conditioning

ConditioningKind = Literal["crossattn", "concat", "adm"]


@dataclass(frozen=True)
class OutputContract:
    """The shape an encoder promises. ``None`` means "depends on the input" (e.g. image size)."""

    kind: ConditioningKind
    channels: int
    tokens: int | None = None  # crossattn: sequence length
    latent_factor: int | None = None  # concat: image size / map size

    def check(self, out: Tensor, *, batch: int, image_hw: tuple[int, int] | None = None) -> None:
        """Raise ValueError when ``out`` breaks this contract."""
        if out.shape[0] != batch:
            raise ValueError(f"encoder returned batch {out.shape[0]}, expected {batch}")
        if self.kind == "crossattn":
            if out.ndim != 3 or out.shape[2] != self.channels:
                raise ValueError(f"crossattn output must be [B, T, {self.channels}], got {list(out.shape)}")
            if self.tokens is not None and out.shape[1] != self.tokens:
                raise ValueError(f"crossattn output must have {self.tokens} tokens, got {out.shape[1]}")
        elif self.kind == "concat":
            if out.ndim != 4 or out.shape[1] != self.channels:
                raise ValueError(f"concat output must be [B, {self.channels}, h, w], got {list(out.shape)}")
            if image_hw is not None and self.latent_factor is not None:
                want = (image_hw[0] // self.latent_factor, image_hw[1] // self.latent_factor)
                if tuple(out.shape[2:]) != want:
                    raise ValueError(f"concat output must be {list(want)} for a {list(image_hw)} image")
        elif out.ndim != 2 or out.shape[1] != self.channels:
            raise ValueError(f"adm output must be [B, {self.channels}], got {list(out.shape)}")


class ConditionEncoder(nn.Module, ABC):
    """Base class of condition encoders. Subclasses set the class attributes and implement the methods.

    ``forward(inputs)`` takes the modality's batch (list of strings, LongTensor of labels, image tensors,
    ...; each subclass documents its type) and returns the conditioning tensor. It must be deterministic in
    eval mode and treat batch items independently.
    """

    #: "text", "class", "semantic", "lowres", "mask", "layout", ...
    modality: ClassVar[str]
    #: how the output enters the UNet
    kind: ClassVar[ConditioningKind]
    #: True when trained jointly with the UNet (LDM BERT, layout transformer, class embedder); False when
    #: frozen (CLIP, MiniLM) — frozen encoders keep ``requires_grad=False`` on every parameter.
    trainable: ClassVar[bool]
    #: CompVis ``cond_stage_config.target`` strings this encoder reproduces (for loading originals)
    compvis_targets: ClassVar[tuple[str, ...]] = ()
    #: True when the encoder can be built on the meta device and then take every tensor from a strict
    #: ``load_state_dict(..., assign=True)`` (its load hooks restoring what a state dict lacks): a model's
    #: cond stage is then built without the random initialisation its checkpoint weights would overwrite
    meta_init: ClassVar[bool] = False

    @abstractmethod
    def contract(self) -> OutputContract:
        """The output shape this instance promises."""

    @abstractmethod
    def unconditional(self, batch_size: int) -> Tensor:
        """The "no condition" output used for classifier-free guidance (and condition dropout in training).

        Encoders whose conditioning cannot be dropped (concat maps of SR / inpainting / semantic models)
        raise ValueError saying so.
        """

    def conditioning(self, out: Tensor) -> Conditioning:
        """Wrap an output tensor in the Conditioning slot its kind feeds."""
        if self.kind == "crossattn":
            return Conditioning(crossattn=out)
        if self.kind == "concat":
            return Conditioning(concat=out)
        return Conditioning(y=out)


class FrozenTextEncoder(ConditionEncoder):
    """A pretrained text transformer that is never trained (CLIP, MiniLM): prompts -> cross-attention
    tokens ``[B, max_length, hidden_size]``. Subclasses set ``max_length`` and ``hidden_size`` and call
    :meth:`freeze` at the end of ``__init__``; the encoder then stays in eval mode with
    ``requires_grad=False`` everywhere (CompVis ``freeze``)."""

    modality: ClassVar[str] = "text"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = False
    max_length: int
    hidden_size: int

    def freeze(self) -> None:
        """Eval mode (no dropout) and ``requires_grad=False`` everywhere."""
        super().train(False)
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> Self:
        """Stays in eval mode whatever ``mode`` is (CompVis replaces ``train`` of frozen stages too)."""
        return super().train(False)

    def unconditional(self, batch_size: int) -> Tensor:
        """The encoding of the empty prompt ``""``, repeated ``batch_size`` times (Stable Diffusion's ``uc``
        for classifier-free guidance)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.forward([""]).repeat(batch_size, 1, 1)

    def contract(self) -> OutputContract:
        return OutputContract(kind="crossattn", channels=self.hidden_size, tokens=self.max_length)


#: factory(**params) -> ConditionEncoder; params are the CompVis ``cond_stage_config.params`` names
EncoderFactory = Callable[..., ConditionEncoder]


@dataclass(frozen=True)
class EncoderSpec:
    """What the ``condition_encoders`` registry holds for one encoder."""

    factory: EncoderFactory
    modality: str
    kind: ConditioningKind
    trainable: bool
    compvis_targets: tuple[str, ...] = ()
    description: str = ""
    meta_init: bool = False

    @property
    def config_target(self) -> str:
        """The ``cond_stage_config.target`` a model records for this encoder: its CompVis original's, or
        (for an encoder with no original, e.g. MiniLM) its own class path."""
        if self.compvis_targets:
            return self.compvis_targets[0]
        return f"{self.factory.__module__}.{self.factory.__qualname__}"

    def claims(self, target: str) -> bool:
        """Whether a model whose ``cond_stage_config.target`` is ``target`` is conditioned by this encoder."""
        return target in self.compvis_targets or target == self.config_target

    @classmethod
    def of(cls, encoder_cls: type[ConditionEncoder], description: str = "") -> EncoderSpec:
        return cls(
            factory=encoder_cls,
            modality=encoder_cls.modality,
            kind=encoder_cls.kind,
            trainable=encoder_cls.trainable,
            compvis_targets=encoder_cls.compvis_targets,
            description=description or (encoder_cls.__doc__ or "").strip().splitlines()[0],
            meta_init=encoder_cls.meta_init,
        )
