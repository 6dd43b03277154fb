"""Original CompVis / Stability-AI YAML configs, read as data, to and from :class:`ModelConfig`.

``config_from_yaml`` reads a ``v1-inference.yaml``-style file (``model.target`` / ``model.params``) with
``yaml.safe_load``; nothing named by a ``target:`` string is imported. Supported ``model.target`` classes
(matched by class name, because forks move the module):

- ``LatentDiffusion`` and ``LatentInpaintDiffusion`` (SD 1.x / 2.x inpainting): a latent diffusion model;
- ``AutoencoderKL``, ``VQModel``, ``VQModelInterface``: a first-stage-only model (``unet`` is None).

``cond_stage_config: __is_unconditional__`` becomes ``cond_stage=None`` (and, as in the original, forces
``conditioning_key`` to None unless ``force_null_conditioning``); ``__is_first_stage__`` becomes the marker
``CondStageConfig(target=FIRST_STAGE_COND)``. When ``conditioning_key`` is absent it is ``concat`` if
``concat_mode`` (default true) else ``crossattn``, exactly as ``LatentDiffusion.__init__`` decides.

Keys that only configure training or logging are accepted and dropped; they are listed, per section, in
:data:`TRAINING_ONLY_KEYS`. Options of the original that would change the network in a way ldm-sdk does not
implement are accepted only at their default value (:data:`UNSUPPORTED_OPTIONS`). Any other key raises a
``ValueError`` naming it, its YAML path and the valid keys there.

``config_to_yaml`` writes the original layout back (loadable by the CompVis code) plus one extra top-level
key, ``ldm_sdk: {family: ...}``, which the original ignores; ``config_from_yaml(config_to_yaml(c)) == c``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ldm_sdk.models.configs import (
    AutoencoderKLConfig,
    CondStageConfig,
    DDConfig,
    DiffusionConfig,
    ModelConfig,
    UNetConfig,
    VQModelConfig,
)

UNCONDITIONAL = "__is_unconditional__"
FIRST_STAGE_COND = "__is_first_stage__"
"""``CondStageConfig.target`` marker: the condition is the first-stage encoding of an image (inpainting)."""
EXTRA_KEY = "ldm_sdk"
"""Top-level YAML key carrying what the original layout cannot: ``{family: <name>}``."""

LATENT_DIFFUSION_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
LATENT_INPAINT_TARGET = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
VQ_TARGET = "ldm.models.autoencoder.VQModel"
VQ_INTERFACE_TARGET = "ldm.models.autoencoder.VQModelInterface"

_LDM_CLASSES = ("LatentDiffusion", "LatentInpaintDiffusion")
_FIRST_STAGE_CLASSES = {"AutoencoderKL": "kl", "VQModel": "vq", "VQModelInterface": "vq"}
UNSUPPORTED_TARGETS: dict[str, str] = {
    "DDPM": "pixel-space DDPM (no first stage); ldm-sdk implements latent diffusion only",
    "LatentUpscaleDiffusion": "the SD 2.x x4 upscaler (low_scale_model noise augmentation, hybrid-adm)",
    "LatentUpscaleFinetuneDiffusion": "the SD 2.x upscaler fine-tune",
    "ImageEmbeddingConditionedLatentDiffusion": "Stable unCLIP (image-embedding adm conditioning)",
    "LatentDepth2ImageDiffusion": "SD 2.x depth2img (needs the MiDaS depth model)",
    "LatentFinetuneDiffusion": "the abstract SD 2.x fine-tune base class",
    "DiffusionEngine": "an SDXL / generative-models (sgm) config, a different architecture",
}

# Keys that configure training, logging or checkpoint restoring only: accepted and dropped, per section.
TRAINING_ONLY_KEYS: dict[str, frozenset[str]] = {
    "<root>": frozenset({"data", "lightning"}),
    "model": frozenset({"base_learning_rate"}),
    "model.params": frozenset(
        {
            "monitor",
            "scheduler_config",
            "ckpt_path",
            "ignore_keys",
            "load_only_unet",
            "lossconfig",
            "personalization_config",
            "use_positional_encodings",
            "cond_stage_forward",
            "num_timesteps_cond",
            "log_every_t",
            "make_it_fit",
            "ucg_training",
            "reset_ema",
            "reset_num_ema_updates",
            # LatentInpaintDiffusion / LatentFinetuneDiffusion fine-tuning bookkeeping
            "finetune_keys",
            "keep_finetune_dims",
            "c_concat_log_start",
            "c_concat_log_end",
        }
    ),
    "first_stage": frozenset(
        {
            "lossconfig",
            "monitor",
            "ckpt_path",
            "ignore_keys",
            "image_key",
            "colorize_nlabels",
            "batch_resize_range",
            "scheduler_config",
            "lr_g_factor",
            "use_ema",
            "ema_decay",
            "learn_logvar",
        }
    ),
    "unet": frozenset(),
    "ddconfig": frozenset(),
}

# Original options ldm-sdk does not implement: accepted only with these (the original's default) values.
UNSUPPORTED_OPTIONS: dict[str, dict[str, object]] = {
    "model.params": {
        "given_betas": None,
        "concat_keys": ["mask", "masked_image"],
        "masked_image_key": "masked_image",
    },
    "unet": {
        "disable_self_attentions": None,
        "num_attention_blocks": None,
        "disable_middle_self_attn": False,
        "use_bf16": False,
        "adm_in_channels": None,
    },
}
# Attention implementations of the original first stage that compute exactly what "vanilla" computes.
_VANILLA_ALIASES = ("vanilla-xformers", "memory-efficient-cross-attn")
# Keys of VQModelConfig that the CompVis VQModel does not take (written only when not the default).
_VQ_EXTENSION_KEYS = ("beta", "unknown_index", "legacy")


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _class_name(target: object, path: str) -> str:
    if not isinstance(target, str) or not target:
        raise ValueError(
            f"{path}: expected a 'target' string such as {LATENT_DIFFUSION_TARGET!r}, got {target!r}"
        )
    return target.rsplit(".", 1)[-1]


def _mapping(value: object, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: expected a mapping, got {type(value).__name__} ({value!r})")
    return dict(value)


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _check_keys(
    section: Mapping[str, Any], path: str, valid: set[str], scope: str, *, required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Drop training-only keys, check unsupported options, refuse unknown keys; return what is left."""
    training = TRAINING_ONLY_KEYS.get(scope, frozenset())
    unsupported = UNSUPPORTED_OPTIONS.get(scope, {})
    out: dict[str, Any] = {}
    for key, value in section.items():
        where = f"{path}.{key}" if path else str(key)
        if key in training:
            continue
        if key in unsupported:
            if _plain(value) != _plain(unsupported[key]):
                raise ValueError(
                    f"{where}={value!r} is not supported by ldm-sdk (only the original default "
                    f"{unsupported[key]!r} is)"
                )
            continue
        if key not in valid:
            allowed = sorted(valid | set(training) | set(unsupported))
            raise ValueError(f"unknown key {key!r} at {where}; valid keys at {path or '<root>'}: {allowed}")
        out[key] = value
    for key in required:
        if key not in out:
            raise ValueError(f"{path or '<root>'}: missing required key {key!r}")
    return out


def _validate(model: type[BaseModel], data: dict[str, Any], path: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{path}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else f"{path}: {e['msg']}"
            for e in err.errors()
        )
        raise ValueError(f"invalid {model.__name__} at {path}: {problems}") from None


# -- reading --------------------------------------------------------------------------------------------
def _load(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    text_or_path = os.fspath(source)
    if isinstance(source, str) and "\n" in source:
        data = yaml.safe_load(source)  # YAML text given directly
    else:
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"original config {path} does not exist (pass a path, YAML text or a dict)"
            )
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping):
        raise ValueError(
            f"an original config is a YAML mapping with a 'model' key; got {type(data).__name__}"
        )
    return dict(data)


def _ddconfig(raw: object, path: str) -> DDConfig:
    dd = _check_keys(_mapping(raw, path), path, _fields(DDConfig), "ddconfig")
    attn_type = dd.get("attn_type")
    if attn_type in _VANILLA_ALIASES:
        dd["attn_type"] = "vanilla"  # same softmax attention, another kernel
    elif attn_type == "linear":
        raise ValueError(f"{path}.attn_type='linear' (LinAttnBlock) is not supported; valid: vanilla, none")
    return _validate(DDConfig, dd, path)


def _first_stage(target: str, raw_params: object, path: str) -> AutoencoderKLConfig | VQModelConfig:
    kind = _FIRST_STAGE_CLASSES.get(_class_name(target, path + ".target"))
    if kind is None:
        raise ValueError(
            f"{path}.target={target!r} is not a supported first stage; valid classes: "
            f"{sorted(_FIRST_STAGE_CLASSES)} (ldm.models.autoencoder)"
        )
    ppath = path + ".params"
    if kind == "kl":
        params = _check_keys(_mapping(raw_params, ppath), ppath, {"embed_dim", "ddconfig"}, "first_stage")
        params["ddconfig"] = _ddconfig(params.get("ddconfig"), ppath + ".ddconfig")
        return _validate(AutoencoderKLConfig, params, ppath)
    valid = {"embed_dim", "ddconfig", "n_embed", "remap", "sane_index_shape", *_VQ_EXTENSION_KEYS}
    params = _check_keys(_mapping(raw_params, ppath), ppath, valid, "first_stage")
    params["ddconfig"] = _ddconfig(params.get("ddconfig"), ppath + ".ddconfig")
    return _validate(VQModelConfig, params, ppath)


def _unet(raw: object, path: str) -> UNetConfig:
    section = _check_keys(
        _mapping(raw, path), path, {"target", "params"}, "unet_config", required=("target",)
    )
    if _class_name(section["target"], path + ".target") != "UNetModel":
        raise ValueError(f"{path}.target={section['target']!r}: only {UNET_TARGET} is supported")
    ppath = path + ".params"
    params = _check_keys(_mapping(section.get("params"), ppath), ppath, _fields(UNetConfig), "unet")
    if isinstance(params.get("num_classes"), str):
        raise ValueError(
            f"{ppath}.num_classes={params['num_classes']!r} (vector 'adm' conditioning of unCLIP / SDXL) "
            "is not supported; valid: an int (class labels) or null"
        )
    return _validate(UNetConfig, params, ppath)


def _cond_stage(raw: object, path: str) -> CondStageConfig | None:
    if raw == UNCONDITIONAL or raw is None:
        return None
    if raw == FIRST_STAGE_COND:
        return CondStageConfig(target=FIRST_STAGE_COND)
    if isinstance(raw, str):
        raise ValueError(
            f"{path}={raw!r}: valid strings are {UNCONDITIONAL!r} and {FIRST_STAGE_COND!r}, "
            "otherwise a mapping with 'target' and 'params'"
        )
    section = _check_keys(_mapping(raw, path), path, {"target", "params"}, "cond_stage", required=("target",))
    return CondStageConfig(target=section["target"], params=_mapping(section.get("params"), path + ".params"))


def _latent_diffusion(class_name: str, raw_params: object, family: str) -> ModelConfig:
    path = "model.params"
    sub = {"unet_config", "first_stage_config", "cond_stage_config", "concat_mode", "force_null_conditioning"}
    params = _check_keys(_mapping(raw_params, path), path, _fields(DiffusionConfig) | sub, "model.params")
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in params:
            raise ValueError(f"{path}: missing required key {key!r} of {class_name}")
    unet = _unet(params.pop("unet_config"), path + ".unet_config")
    fs_path = path + ".first_stage_config"
    fs_section = _check_keys(
        _mapping(params.pop("first_stage_config"), fs_path),
        fs_path,
        {"target", "params"},
        "fs",
        required=("target",),
    )
    first_stage = _first_stage(fs_section["target"], fs_section.get("params"), fs_path)
    raw_cond = params.pop("cond_stage_config")
    cond_stage = _cond_stage(raw_cond, path + ".cond_stage_config")
    # LatentDiffusion.__init__: the conditioning key follows concat_mode when absent, and is None for an
    # unconditional model unless force_null_conditioning.
    concat_mode = params.pop("concat_mode", True)
    force_null = params.pop("force_null_conditioning", False)
    if params.get("conditioning_key") is None:
        params["conditioning_key"] = "concat" if concat_mode else "crossattn"
    if raw_cond == UNCONDITIONAL and not force_null:
        params["conditioning_key"] = None
    key = params["conditioning_key"]
    if key is not None and key not in ("concat", "crossattn", "hybrid", "adm"):
        raise ValueError(
            f"{path}.conditioning_key={key!r} is not supported; valid: concat, crossattn, hybrid, adm or null"
        )
    diffusion = _validate(DiffusionConfig, params, path)
    return ModelConfig(
        family=family, first_stage=first_stage, unet=unet, diffusion=diffusion, cond_stage=cond_stage
    )


def config_from_yaml(
    source: str | os.PathLike[str] | Mapping[str, Any], *, family: str | None = None
) -> ModelConfig:
    """Read an original CompVis / SD YAML (a path, YAML text or the loaded dict) into a :class:`ModelConfig`.

    ``family`` names the result; when None it is taken from the ``ldm_sdk.family`` key, else from the one
    known family (:mod:`ldm_sdk.checkpoints.families`) whose configuration this is, else ``"custom"``.
    """
    data = _load(source)
    top = _check_keys(data, "", {"model", EXTRA_KEY}, "<root>", required=("model",))
    extra = _check_keys(_mapping(top.get(EXTRA_KEY), EXTRA_KEY), EXTRA_KEY, {"family"}, "extra")
    model = _check_keys(
        _mapping(top["model"], "model"), "model", {"target", "params"}, "model", required=("target",)
    )
    class_name = _class_name(model["target"], "model.target")
    name = family or extra.get("family") or "custom"
    if class_name in UNSUPPORTED_TARGETS:
        raise ValueError(
            f"model.target={model['target']!r} is not supported: {UNSUPPORTED_TARGETS[class_name]}. "
            f"Supported targets: {sorted([*_LDM_CLASSES, *_FIRST_STAGE_CLASSES])}"
        )
    if class_name in _LDM_CLASSES:
        config = _latent_diffusion(class_name, model.get("params"), name)
    elif class_name in _FIRST_STAGE_CLASSES:
        config = ModelConfig(
            family=name, first_stage=_first_stage(model["target"], model.get("params"), "model")
        )
    else:
        raise ValueError(
            f"model.target={model['target']!r} is not a known model class; supported: "
            f"{sorted([*_LDM_CLASSES, *_FIRST_STAGE_CLASSES])}"
        )
    if family is None and "family" not in extra:
        from ldm_sdk.checkpoints.families import match_family  # here: families imports this module

        matched = match_family(config)
        if matched is not None:
            config = config.model_copy(update={"family": matched})
    return config


# -- writing --------------------------------------------------------------------------------------------
def _first_stage_yaml(fs: AutoencoderKLConfig | VQModelConfig, *, standalone: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"embed_dim": fs.embed_dim}
    if isinstance(fs, VQModelConfig):
        params["n_embed"] = fs.n_embed
        defaults = VQModelConfig.model_fields
        for key in ("remap", "sane_index_shape", *_VQ_EXTENSION_KEYS):
            value = getattr(fs, key)
            if value != defaults[key].default:
                params[key] = value
        target = VQ_TARGET if standalone else VQ_INTERFACE_TARGET
    else:
        target = KL_TARGET
    params["ddconfig"] = fs.ddconfig.model_dump(mode="json")
    params["lossconfig"] = {"target": "torch.nn.Identity"}  # the original constructor requires one
    return {"target": target, "params": params}


def config_to_yaml(config: ModelConfig) -> dict[str, Any]:
    """The original-style YAML dict of ``config`` (``yaml.safe_dump`` it to write a file)."""
    out: dict[str, Any] = {}
    if config.unet is None or config.diffusion is None:
        out["model"] = _first_stage_yaml(config.first_stage, standalone=True)
    else:
        diffusion = config.diffusion
        params: dict[str, Any] = diffusion.model_dump(mode="json")
        params["unet_config"] = {"target": UNET_TARGET, "params": config.unet.model_dump(mode="json")}
        params["first_stage_config"] = _first_stage_yaml(config.first_stage, standalone=False)
        cond = config.cond_stage
        if cond is None:
            params["cond_stage_config"] = UNCONDITIONAL
            if diffusion.conditioning_key is not None:
                params["force_null_conditioning"] = True
        elif cond.target == FIRST_STAGE_COND:
            params["cond_stage_config"] = FIRST_STAGE_COND
        else:
            params["cond_stage_config"] = {"target": cond.target, "params": copy.deepcopy(cond.params)}
        inpaint = (
            diffusion.conditioning_key == "hybrid" and config.unet.in_channels == 2 * diffusion.channels + 1
        )
        out["model"] = {
            "target": LATENT_INPAINT_TARGET if inpaint else LATENT_DIFFUSION_TARGET,
            "params": params,
        }
    if config.family != "custom":
        out[EXTRA_KEY] = {"family": config.family}
    return out
