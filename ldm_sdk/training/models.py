"""What the training scripts build: model configs from a name or file, and condition encoders from the
plugin registry, with the batch key each one reads.

Model specs (``--model``):

- a first-stage zoo name (``kl-f4``, ``kl-f8``, ``vq-f4`` ...: :data:`ldm_sdk.models.zoo.FIRST_STAGE_ZOO`)
  or a model family (``ldm-celebahq256``, ``sd1`` ...: :data:`ldm_sdk.checkpoints.families.FAMILIES`);
- ``tiny:NAME``: the tiny test configs of :mod:`ldm_sdk.testing.tiny` (``tiny:kl-f4``, ``tiny:vq-f4``,
  ``tiny:kl-f8``, and the LDMs ``tiny:ldm_kl_f4_uncond``, ``tiny:ldm_vq_f4_class``, ``tiny:sd1`` ...);
- a file: an original CompVis YAML (``*.yaml``: an autoencoder or a ``LatentDiffusion`` config), or an
  ldm-sdk ``ModelConfig`` JSON (``*.json``).

Conditioning keys trained: none, ``crossattn``, ``concat``, ``adm`` (one encoder), and ``hybrid`` (two: the
model's cond stage through cross-attention - text or class - plus a weight-free concat encoder, by default
``mask`` for an inpainting UNet of ``2 * latent + 1`` input channels, Stable Diffusion inpainting's layout).
The checkpoint records the cross-attention encoder as the cond stage, as SD inpainting's config does; the
concat map is rebuilt at sampling time from the first stage by the same encoder class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.encoders.base import ConditionEncoder, EncoderSpec, OutputContract
from ldm_sdk.models.configs import CondStageConfig, FirstStageConfig, ModelConfig

#: encoder modality -> the dataset key it reads by default (CompVis ``cond_stage_key`` names where they exist)
MODALITY_KEYS: dict[str, str] = {
    "text": "caption",
    "class": "class_label",
    "semantic": "segmentation",
    "lowres": "lowres",
    "mask": "mask",
    "layout": "boxes",
}


def _tiny(name: str) -> ModelConfig:
    from ldm_sdk.testing import tiny

    first_stages = {"kl-f4": tiny.TINY_KL_F4, "kl-f8": tiny.TINY_KL_F8, "vq-f4": tiny.TINY_VQ_F4}
    if name in first_stages:
        return ModelConfig(family=f"tiny-{name}", first_stage=first_stages[name])
    if name in tiny.ALL:
        return tiny.ALL[name]
    raise ValueError(f"unknown tiny model {name!r}; valid: {sorted([*first_stages, *tiny.ALL])}")


def model_config(spec: str) -> ModelConfig:
    """The :class:`ModelConfig` a ``--model`` spec names (see the module docstring)."""
    from ldm_sdk.checkpoints.families import FAMILIES
    from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

    if spec.startswith("tiny:"):
        return _tiny(spec.removeprefix("tiny:"))
    if spec in FIRST_STAGE_ZOO:
        return ModelConfig(family=spec, first_stage=FIRST_STAGE_ZOO[spec])
    if spec in FAMILIES:
        return FAMILIES[spec].config
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        from ldm_sdk.checkpoints.original_config import config_from_yaml

        return config_from_yaml(path)
    if path.suffix.lower() == ".json" and path.is_file():
        return ModelConfig.model_validate_json(path.read_text(encoding="utf-8"))
    raise ValueError(
        f"--model {spec!r} is neither a file (.yaml original config, .json ModelConfig) nor a known name; "
        f"first stages: {sorted(FIRST_STAGE_ZOO)}; families: {sorted(FAMILIES)}; or tiny:NAME"
    )


def first_stage_config(spec: str) -> tuple[str, FirstStageConfig]:
    """(family name, first-stage config) of a ``--model`` spec (an LDM spec gives its first stage)."""
    config = model_config(spec)
    return config.family, config.first_stage


# -- condition encoders -------------------------------------------------------------------------------------
def choose_encoder(registry: Any, config: ModelConfig, name: str | None) -> tuple[str, EncoderSpec] | None:
    """The registry entry that conditions this model: ``name`` when given, else the one that claims the
    config's ``cond_stage_config.target`` (preferring the modality of ``cond_stage_key``); None when the
    model is unconditional."""
    from ldm_sdk.encoders.from_bundle import COND_STAGE_KEY_MODALITY, encoder_specs

    specs = encoder_specs(registry)
    if name is not None:
        if name not in specs:
            raise ValueError(f"unknown condition encoder {name!r}; registered: {sorted(specs)}")
        return name, specs[name]
    cond = config.cond_stage
    if cond is None:
        return None
    claiming = sorted(n for n, s in specs.items() if s.claims(cond.target))
    if not claiming:
        raise ValueError(
            f"no registered condition encoder reproduces cond_stage_config.target {cond.target!r}; pass "
            f"--cond-encoder NAME, one of {sorted(specs)}"
        )
    key = config.diffusion.cond_stage_key if config.diffusion is not None else ""
    modality = COND_STAGE_KEY_MODALITY.get(key)
    preferred = [n for n in claiming if specs[n].modality == modality] or claiming
    return preferred[0], specs[preferred[0]]


def build_encoder(
    name: str, spec: EncoderSpec, params: Mapping[str, Any], *, first_stage: Any = None, bundle: Any = None
) -> ConditionEncoder:
    """Construct a fresh encoder (no checkpoint weights) with ``params`` (CompVis param names)."""
    try:
        if spec.compvis_targets == ("__is_first_stage__",):
            from_bundle = getattr(spec.factory, "from_bundle", None)
            encoder = (
                from_bundle(bundle, **params)
                if callable(from_bundle)
                else spec.factory(first_stage, **params)
            )
        else:
            encoder = spec.factory(**params)
    except TypeError as exc:
        raise ValueError(f"--cond-params {dict(params)} do not fit the {name!r} encoder: {exc}") from exc
    if not isinstance(encoder, ConditionEncoder):
        raise TypeError(
            f"the {name!r} encoder factory returned {type(encoder).__name__}, not a ConditionEncoder"
        )
    return encoder


def cond_stage_config(spec: EncoderSpec, params: Mapping[str, Any]) -> CondStageConfig:
    """What the trained model's config records about its encoder (JSON-plain params only)."""
    plain = {k: v for k, v in params.items() if isinstance(v, str | int | float | bool | list | dict | None)}
    return CondStageConfig(target=spec.config_target, params=plain)


def encoder_input(encoder: ConditionEncoder, batch: Mapping[str, Any], key: str) -> Any:
    """The encoder's input from a collated batch: captions as a list, labels as a LongTensor, ``mask`` as a
    :class:`~ldm_sdk.encoders.mask.MaskedImage` of ``image`` and ``mask``, ``boxes`` (+ ``box_classes``)
    as layouts; anything else as the batch holds it."""
    if key not in batch:
        raise ValueError(
            f"the batch has no {key!r} for the {encoder.modality} encoder; it has {sorted(batch)}"
        )
    value = batch[key]
    if encoder.modality == "mask":
        from ldm_sdk.encoders.mask import MaskedImage

        if "image" not in batch:
            raise ValueError(
                "the inpainting condition encodes the masked IMAGE, but the batch has no 'image' "
                "(precomputed latents cannot be masked): train on images (--data folder:, scenes ...); "
                f"it has {sorted(batch)}"
            )
        return MaskedImage(image=batch["image"], mask=value)
    if encoder.modality == "layout" and "box_classes" in batch:
        from ldm_sdk.training.data.scenes import layout_objects

        return [layout_objects(b, c) for b, c in zip(value, batch["box_classes"], strict=True)]
    if encoder.modality == "text" and isinstance(value, str):
        return [value]
    return value


#: conditioning keys whose UNet input is the latent plus concatenated channels
CONCAT_KEYS = ("concat", "hybrid")
#: conditioning keys the LDM trainer supports (one encoder each, hybrid: two)
TRAINED_KEYS: tuple[str | None, ...] = (None, "crossattn", "concat", "adm", "hybrid")


def choose_concat_encoder(
    registry: Any, config: ModelConfig, name: str | None
) -> tuple[str, EncoderSpec] | None:
    """The concat encoder of a ``hybrid`` model (None for any other key): ``name`` when given, else ``mask``
    when the UNet takes ``2 * latent + 1`` channels (Stable Diffusion inpainting). It must be a frozen,
    weight-free ``concat`` encoder: the checkpoint's cond stage is the cross-attention encoder, so the concat
    map has to be rebuilt from the model alone when it is loaded."""
    from ldm_sdk.encoders.from_bundle import encoder_specs

    specs = encoder_specs(registry)
    concat_names = sorted(n for n, s in specs.items() if s.kind == "concat" and not s.trainable)
    key = config.diffusion.conditioning_key if config.diffusion is not None else None
    if key != "hybrid":
        if name is not None:
            raise ValueError(
                f"--concat-encoder {name!r} is for hybrid models (a concat map plus cross-attention); this "
                f"model's conditioning_key is {key!r}: give its one encoder with --cond-encoder"
            )
        return None
    if name is None:
        latent = config.first_stage.embed_dim
        in_channels = config.unet.in_channels if config.unet is not None else latent
        if in_channels != 2 * latent + 1:
            raise ValueError(
                f"the hybrid UNet takes {in_channels} input channels = {latent} latent + "
                f"{in_channels - latent} concat, not the inpainting layout ({2 * latent + 1}: latent, mask, "
                f"masked-image latent): pass --concat-encoder NAME, one of {concat_names}"
            )
        name = "mask"
    if name not in specs:
        raise ValueError(f"unknown concat encoder {name!r}; registered concat encoders: {concat_names}")
    spec = specs[name]
    if spec.kind != "concat" or spec.trainable:
        raise ValueError(
            f"--concat-encoder {name!r} is a {'trained ' if spec.trainable else ''}{spec.kind} encoder; the "
            f"concat part of a hybrid model needs a frozen, weight-free concat encoder: one of {concat_names}"
        )
    return name, spec


def build_concat_encoder(name: str, spec: EncoderSpec, bundle: Any) -> ConditionEncoder:
    """The hybrid model's concat encoder on ``bundle`` (as the sampling tasks build it: no params)."""
    encoder = build_encoder(name, spec, {}, first_stage=bundle.first_stage_model, bundle=bundle)
    if encoder.state_dict():
        raise ValueError(
            f"the {name!r} concat encoder has weights ({sorted(encoder.state_dict())[:3]} ...); a hybrid "
            "checkpoint stores only the cross-attention encoder, so the concat encoder must have none"
        )
    return encoder.eval().requires_grad_(False)


def check_conditioning(
    encoder: ConditionEncoder | None, config: ModelConfig, concat: ConditionEncoder | None = None
) -> None:
    """Refuse encoders whose output cannot feed this UNet (kind vs conditioning key, widths). ``concat``:
    the concat encoder of a hybrid model (``encoder`` is then its cross-attention encoder)."""
    if config.unet is None or config.diffusion is None:
        raise ValueError(f"{config.family!r} is a first-stage-only config: give an LDM config (--model)")
    key = config.diffusion.conditioning_key
    latent, unet = config.first_stage.embed_dim, config.unet
    if unet.out_channels != latent or (key not in CONCAT_KEYS and unet.in_channels != latent):
        raise ValueError(
            f"the first stage has {latent} latent channels but the UNet takes {unet.in_channels} and gives "
            f"{unet.out_channels}: give a first stage (--first-stage) or a model (--model) that match"
        )
    if key not in TRAINED_KEYS:
        raise ValueError(f"conditioning_key {key!r} is not trained here; valid: {list(TRAINED_KEYS)}")
    if key == "hybrid":
        if encoder is None or concat is None:
            raise ValueError(
                "a hybrid model needs a cross-attention encoder (--cond-encoder, default: the config's cond "
                "stage) and a concat encoder (--concat-encoder, default: mask)"
            )
        contract = encoder.contract()
        if contract.kind != "crossattn":
            raise ValueError(
                f"in a hybrid model --cond-encoder is the cross-attention part (text, class); "
                f"{type(encoder).__name__} is a {contract.kind} encoder (the concat part is --concat-encoder)"
            )
        _check_widths(contract, config)
        _check_widths(concat.contract(), config)
        return
    if concat is not None:
        raise ValueError(f"a concat encoder is for hybrid models; this one's conditioning_key is {key!r}")
    if encoder is None:
        if key is not None:
            raise ValueError(
                f"the model is conditioned ({key!r}) but no encoder was chosen: pass --cond-encoder"
            )
        return
    contract = encoder.contract()
    if key != contract.kind:
        raise ValueError(
            f"a {contract.kind} encoder ({type(encoder).__name__}) needs conditioning_key "
            f"{contract.kind!r}; the model has {key!r}"
        )
    _check_widths(contract, config)


def _check_widths(contract: OutputContract, config: ModelConfig) -> None:
    assert config.unet is not None
    unet = config.unet
    if contract.kind == "crossattn" and unet.context_dim not in (None, contract.channels):
        raise ValueError(
            f"the encoder gives {contract.channels}-d tokens but the UNet's context_dim is {unet.context_dim}"
        )
    if contract.kind == "concat":
        want = unet.in_channels - config.first_stage.embed_dim
        if want != contract.channels:
            raise ValueError(
                f"the UNet takes {unet.in_channels} input channels = {config.first_stage.embed_dim} latent + "
                f"{want} concat, but the encoder concatenates {contract.channels}"
            )


def can_drop(encoder: ConditionEncoder | None) -> bool:
    """Whether condition dropout is possible (the encoder has an unconditional output)."""
    if encoder is None:
        return False
    try:
        with torch.no_grad():
            out: Tensor = encoder.unconditional(1)
    except ValueError:
        return False
    return isinstance(out, Tensor)


__all__ = [
    "CONCAT_KEYS",
    "MODALITY_KEYS",
    "TRAINED_KEYS",
    "build_concat_encoder",
    "build_encoder",
    "can_drop",
    "check_conditioning",
    "choose_concat_encoder",
    "choose_encoder",
    "cond_stage_config",
    "encoder_input",
    "first_stage_config",
    "model_config",
]
