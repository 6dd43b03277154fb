"""What the training scripts build: model configs from a name or file, and condition encoders from the
plugin registry, with the batch key each one reads.

Model specs (``--model``):

- a first-stage zoo name (``kl-f4``, ``kl-f8``, ``vq-f4`` ...: :data:`ldm_sdk.models.zoo.FIRST_STAGE_ZOO`)
  or a model family (``ldm-celebahq256``, ``sd1`` ...: :data:`ldm_sdk.checkpoints.families.FAMILIES`);
- ``tiny:NAME``: the tiny test configs of :mod:`ldm_sdk.testing.tiny` (``tiny:kl-f4``, ``tiny:vq-f4``,
  ``tiny:kl-f8``, and the LDMs ``tiny:ldm_kl_f4_uncond``, ``tiny:ldm_vq_f4_class``, ``tiny:sd1`` ...);
- a file: an original CompVis YAML (``*.yaml``: an autoencoder or a ``LatentDiffusion`` config), or an
  ldm-sdk ``ModelConfig`` JSON (``*.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.encoders.base import ConditionEncoder, EncoderSpec
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

        return MaskedImage(image=batch["image"], mask=value)
    if encoder.modality == "layout" and "box_classes" in batch:
        from ldm_sdk.training.data.scenes import layout_objects

        return [layout_objects(b, c) for b, c in zip(value, batch["box_classes"], strict=True)]
    if encoder.modality == "text" and isinstance(value, str):
        return [value]
    return value


def check_conditioning(encoder: ConditionEncoder | None, config: ModelConfig) -> None:
    """Refuse an encoder whose output cannot feed this UNet (kind vs conditioning key, widths)."""
    if config.unet is None or config.diffusion is None:
        raise ValueError(f"{config.family!r} is a first-stage-only config: give an LDM config (--model)")
    key = config.diffusion.conditioning_key
    latent, unet = config.first_stage.embed_dim, config.unet
    if unet.out_channels != latent or (key != "concat" and unet.in_channels != latent):
        raise ValueError(
            f"the first stage has {latent} latent channels but the UNet takes {unet.in_channels} and gives "
            f"{unet.out_channels}: give a first stage (--first-stage) or a model (--model) that match"
        )
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
            f"{contract.kind!r}; the model has {key!r} (one encoder per model: hybrid keys, two conditions "
            "at once, are not trained here)"
        )
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
    "MODALITY_KEYS",
    "build_encoder",
    "can_drop",
    "check_conditioning",
    "choose_encoder",
    "cond_stage_config",
    "encoder_input",
    "first_stage_config",
    "model_config",
]
