"""diffusers folders in and out, without importing diffusers.

``to_diffusers(bundle, folder)`` writes ``model_index.json``, ``unet/`` (``UNet2DConditionModel``),
``vae/`` (``AutoencoderKL``, or ``VQModel`` for a VQ first stage) and ``scheduler/`` (a ``DDIMScheduler``
config equivalent to the CompVis schedule: CompVis ``linear`` is diffusers ``scaled_linear``, ``sqrt_linear``
is ``linear``, ``cosine`` is ``squaredcos_cap_v2``, ``sqrt`` is written as ``trained_betas``).
``from_diffusers(folder)`` reads those (weights as ``.safetensors`` or ``.bin`` through the safe loader,
sharded or not) into a :class:`ModelBundle` with CompVis names.

What maps: the UNets CompVis expresses with ``SpatialTransformer`` cross-attention (SD 1.x/2.x, inpainting,
LDM text/class/layout models), including class labels (``num_classes`` <-> ``num_class_embeds``), conv or
linear transformer projections, scale-shift norm, one head count per level; the KL and VQ autoencoders
(level attention included) whose ``z_channels`` equal ``embed_dim`` (KL) and whose ``ch_mult`` starts at 1.
Not supported (a clear error says which): UNets with plain ``AttentionBlock`` attention (the
unconditional / concat LDM zoo models, which diffusers holds as ``UNet2DModel``), ``resblock_updown``,
``conv_resample=False``, ``n_embed``; on the diffusers side any block type, embedding or option outside
that subset.

The conditioning encoder is not converted on export (``text_encoder`` / ``tokenizer`` are written as
absent). On import, a ``text_encoder`` whose CompVis layout is the same (``CLIPTextModel`` for
``FrozenCLIPEmbedder``) is carried over as ``cond_stage_model.transformer.*``. ``model_index.json`` also keeps
the full ldm-sdk ``ModelConfig`` under ``_ldm_sdk`` (diffusers ignores ``_`` keys), so a folder we wrote
reads back to the same config; a folder diffusers wrote is matched against the known families.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import COND_STAGE_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, ModelBundle
from ldm_sdk.checkpoints.diffusers_config import (
    DIFFUSERS_VERSION,
    DiffusersFormatError,
    diffusion_from_scheduler,
    first_stage_from_vae,
    first_stage_to_vae,
    scheduler_config,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldm_sdk.checkpoints.diffusers_keys import convert, unet_pairs, vae_pairs
from ldm_sdk.checkpoints.families import (
    FAMILIES,
    first_stage_attention_levels,
    inference_signature,
    matching_families,
    unet_attention_levels,
)
from ldm_sdk.checkpoints.structure import FirstStageStructure
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import (
    AutoencoderKLConfig,
    CondStageConfig,
    DiffusionConfig,
    ModelConfig,
    VQModelConfig,
)
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

__all__ = [
    "DiffusersFormatError",
    "config_from_diffusers",
    "from_diffusers",
    "to_diffusers",
    "to_diffusers_vae",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
META_KEY = "_ldm_sdk"
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


def _unet_levels(config: ModelConfig) -> tuple[int, ...]:
    assert config.unet is not None
    return unet_attention_levels(config.unet.attention_resolutions, len(config.unet.channel_mult))


def _vae_levels(fs: AutoencoderKLConfig | VQModelConfig) -> tuple[int, ...]:
    dd = fs.ddconfig
    return first_stage_attention_levels(dd.attn_resolutions, len(dd.ch_mult), dd.resolution)


# -- writing --------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write_weights(folder: Path, tensors: dict[str, Tensor], dtype: torch.dtype | None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.clone(memory_format=torch.contiguous_format)
    save_file(out, str(folder / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})


def _pipeline_class(config: ModelConfig) -> str:
    assert config.unet is not None and config.diffusion is not None
    kl = isinstance(config.first_stage, AutoencoderKLConfig)
    text = config.cond_stage is not None and config.cond_stage.target in (CLIP_TARGET, OPENCLIP_TARGET)
    if kl and text and config.diffusion.conditioning_key == "crossattn" and config.unet.num_classes is None:
        return "StableDiffusionPipeline"
    if kl and text and config.diffusion.conditioning_key == "hybrid":
        return "StableDiffusionInpaintPipeline"
    return "DiffusionPipeline"  # no diffusers pipeline runs this model; its components load one by one


def to_diffusers(
    bundle: ModelBundle, folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> Path:
    """Write ``bundle`` as a diffusers folder (``unet``, ``vae``, ``scheduler``, ``model_index.json``); a
    first-stage-only bundle becomes a model folder (``config.json`` and weights, as :func:`to_diffusers_vae`).

    Raises :class:`DiffusersFormatError` (before writing anything) when the model is outside what
    ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``VQModel`` express."""
    config = bundle.config
    if config.unet is None or config.diffusion is None:
        return to_diffusers_vae(bundle, folder, dtype=dtype)
    unet_json = unet_to_diffusers(config.unet, sample_size=config.diffusion.image_size)
    vae_json = first_stage_to_vae(config.first_stage, scale_factor=bundle.scale_factor)
    sched_json = scheduler_config(config.diffusion)
    unet_state = convert(
        bundle.unet.state_dict(),
        unet_pairs(config.unet, _unet_levels(config)),
        to_diffusers=True,
        what="UNet",
    )
    vae_state = convert(
        bundle.first_stage_model.state_dict(),
        vae_pairs(config.first_stage.ddconfig, _vae_levels(config.first_stage)),
        to_diffusers=True,
        what="first stage",
    )
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "unet" / "config.json", unet_json)
    _write_weights(root / "unet", unet_state, dtype)
    _write_json(root / "vae" / "config.json", vae_json)
    _write_weights(root / "vae", vae_state, dtype)
    _write_json(root / "scheduler" / "scheduler_config.json", sched_json)
    pipeline = _pipeline_class(config)
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        META_KEY: {"config": config.model_dump(mode="json"), "scale_factor": bundle.scale_factor},
        "scheduler": ["diffusers", sched_json["_class_name"]],
        "unet": ["diffusers", unet_json["_class_name"]],
        "vae": ["diffusers", vae_json["_class_name"]],
    }
    if pipeline.startswith("StableDiffusion"):
        index.update(
            text_encoder=[None, None],
            tokenizer=[None, None],
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    _write_json(root / "model_index.json", index)
    return root


def to_diffusers_vae(
    bundle: ModelBundle, folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> Path:
    """Write the first stage alone as a diffusers ``AutoencoderKL`` / ``VQModel`` folder (for a
    first-stage-only bundle, its ModelConfig is kept under ``_ldm_sdk`` in ``config.json``)."""
    fs = bundle.config.first_stage
    root = Path(folder)
    vae_json = first_stage_to_vae(fs, scale_factor=bundle.scale_factor)
    if bundle.config.unet is None:
        vae_json[META_KEY] = {"config": bundle.config.model_dump(mode="json")}
    state = convert(
        bundle.first_stage_model.state_dict(),
        vae_pairs(fs.ddconfig, _vae_levels(fs)),
        to_diffusers=True,
        what="first stage",
    )
    _write_json(root / "config.json", vae_json)
    _write_weights(root, state, dtype)
    return root


# -- reading --------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiffusersFormatError(f"{path} is missing: not a diffusers folder (or not this component)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path}: expected a JSON object")
    return data


def _read_weights(folder: Path, stem: str = WEIGHTS_NAME, variant: str | None = None) -> dict[str, Tensor]:
    """A component's weights: ``<stem>[.<variant>].safetensors`` or ``.bin``, whole or sharded."""
    from ldm_sdk.checkpoints.safe_load import read_checkpoint

    name = f"{stem}.{variant}" if variant else stem
    for suffix in (".safetensors", ".bin"):
        single = folder / f"{name}{suffix}"
        if single.is_file():
            return read_checkpoint(single).tensors
        index = folder / f"{name}{suffix}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            out: dict[str, Tensor] = {}
            for shard in shards:
                out.update(read_checkpoint(folder / shard).tensors)
            return out
    raise DiffusersFormatError(
        f"{folder}: no weights found (looked for {name}.safetensors, {name}.bin and their .index.json shards)"
    )


def _text_encoder(
    root: Path, index: dict[str, Any], variant: str | None
) -> tuple[CondStageConfig | None, dict[str, Tensor]]:
    """The conditioning encoder a diffusers ``text_encoder`` stands for, and its weights in CompVis layout."""
    entry = index.get("text_encoder")
    folder = root / "text_encoder"
    if not (isinstance(entry, list) and entry and entry[0]) or not (folder / "config.json").is_file():
        return None, {}
    te = _read_json(folder / "config.json")
    if "CLIPTextModel" not in te.get("architectures", []):
        return None, {}
    if te.get("hidden_size") == 768:
        weights = _read_weights(folder, "model", variant) if any(folder.glob("model*")) else {}
        return CondStageConfig(target=CLIP_TARGET), {"transformer." + k: v for k, v in weights.items()}
    if te.get("hidden_size") == 1024:  # SD 2.x: OpenCLIP ViT-H text tower in transformers layout
        return CondStageConfig(target=OPENCLIP_TARGET, params={"freeze": True, "layer": "penultimate"}), {}
    return None, {}


def _same_network(a: ModelConfig, b: ModelConfig) -> bool:
    sa, sb = inference_signature(a, with_cond_stage=False), inference_signature(b, with_cond_stage=False)
    keys = (
        "timesteps",
        "beta_schedule",
        "linear_start",
        "linear_end",
        "parameterization",
        "conditioning_key",
    )
    return (
        sa["unet"] == sb["unet"]
        and sa["first_stage"] == sb["first_stage"]
        and all(sa["diffusion"][k] == sb["diffusion"][k] for k in keys)
    )


def config_from_diffusers(folder: str | os.PathLike[str]) -> tuple[ModelConfig, float]:
    """The ModelConfig (and latent scale factor) a diffusers folder holds, without reading weights."""
    root = Path(folder)
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    unet = unet_from_diffusers(_read_json(root / "unet" / "config.json"))
    vae_json = _read_json(root / "vae" / "config.json")
    first_stage, scale_factor = first_stage_from_vae(vae_json)
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    diffusion: DiffusionConfig = diffusion_from_scheduler(
        sched, unet=unet, latent_channels=first_stage.embed_dim, scale_factor=scale_factor
    )
    cond, _ = _text_encoder(root, index, None)
    derived = ModelConfig(
        family="custom", first_stage=first_stage, unet=unet, diffusion=diffusion, cond_stage=cond
    )
    meta = index.get(META_KEY)
    if isinstance(meta, dict) and "config" in meta:
        stored = ModelConfig.model_validate(meta["config"])
        if not _same_network(stored, derived):
            raise DiffusersFormatError(
                f"{root}: the ldm-sdk config recorded in model_index.json does not match the folder's "
                "unet/vae/scheduler configs (edited after export?); remove the '_ldm_sdk' entry to read the "
                "folder from its diffusers configs alone"
            )
        return stored, float(meta.get("scale_factor", scale_factor))
    names = [
        n
        for n in matching_families(derived, with_cond_stage=False)
        if _same_network(FAMILIES[n].config, derived)
    ]
    if len(names) == 1:
        return FAMILIES[names[0]].config, scale_factor
    return derived, scale_factor


def _first_stage_config(root: Path) -> ModelConfig:
    """The first-stage-only ModelConfig of a diffusers ``AutoencoderKL`` / ``VQModel`` folder."""
    vae_json = _read_json(root / "config.json")
    first_stage, _ = first_stage_from_vae(vae_json)
    meta = vae_json.get(META_KEY)
    if isinstance(meta, dict) and "config" in meta:
        stored = ModelConfig.model_validate(meta["config"])
        if stored.unet is None and FirstStageStructure.from_config(
            stored.first_stage
        ) == FirstStageStructure.from_config(first_stage):
            return stored
        raise DiffusersFormatError(f"{root}: the ldm-sdk config in config.json does not match the folder's")
    structure = FirstStageStructure.from_config(first_stage)
    for name, zoo in FIRST_STAGE_ZOO.items():
        if FirstStageStructure.from_config(zoo) == structure:
            return ModelConfig(family=name, first_stage=zoo)
    return ModelConfig(family="custom", first_stage=first_stage)


def from_diffusers(folder: str | os.PathLike[str], *, variant: str | None = None) -> ModelBundle:
    """Read a diffusers folder into a bundle: a pipeline (``unet``, ``vae``, ``scheduler``; optional
    ``text_encoder``), or a lone ``AutoencoderKL`` / ``VQModel`` folder (a first-stage-only bundle)."""
    from ldm_sdk.checkpoints.loader import bundle_from_checkpoint
    from ldm_sdk.checkpoints.safe_load import CheckpointFile

    root = Path(folder)
    if not (root / "unet").is_dir() and (root / "config.json").is_file():
        fs_config = _first_stage_config(root)
        weights = convert(
            _read_weights(root, variant=variant),
            vae_pairs(fs_config.first_stage.ddconfig, _vae_levels(fs_config.first_stage)),
            to_diffusers=False,
            what=str(root),
        )
        return bundle_from_checkpoint(
            CheckpointFile(root, "safetensors", weights, {}, "safetensors"), fs_config
        )
    config, scale_factor = config_from_diffusers(root)
    assert config.unet is not None and config.diffusion is not None
    unet = convert(
        _read_weights(root / "unet", variant=variant),
        unet_pairs(config.unet, _unet_levels(config)),
        to_diffusers=False,
        what=f"{root / 'unet'}",
    )
    vae = convert(
        _read_weights(root / "vae", variant=variant),
        vae_pairs(config.first_stage.ddconfig, _vae_levels(config.first_stage)),
        to_diffusers=False,
        what=f"{root / 'vae'}",
    )
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    _, cond_weights = _text_encoder(root, index, variant)
    tensors: dict[str, Tensor] = dict(DiffusionSchedule.from_config(config.diffusion).state_dict())
    if config.diffusion.scale_by_std:
        tensors["scale_factor"] = torch.tensor(scale_factor)
    tensors.update({UNET_PREFIX + k: v for k, v in unet.items()})
    tensors.update({FIRST_STAGE_PREFIX + k: v for k, v in vae.items()})
    tensors.update({COND_STAGE_PREFIX + k: v for k, v in cond_weights.items()})
    ckpt = CheckpointFile(root, "safetensors", tensors, {"diffusers_folder": str(root)}, "safetensors")
    bundle = bundle_from_checkpoint(ckpt, config)
    bundle.scale_factor = scale_factor
    return bundle
