"""The known model families: the original YAML of each released model, as data, and its ModelConfig.

Each family is written as the ``model:`` section of its original config (CompVis/latent-diffusion,
CompVis/stable-diffusion, runwayml/stable-diffusion, Stability-AI/stablediffusion) and parsed with
:func:`~ldm_sdk.checkpoints.original_config.config_from_yaml`, so the data below reads like the file it came
from. Training-only keys (``monitor``, ``scheduler_config``, ``data``, ``lightning`` ...) are left out
because the parser drops them anyway. Values were checked against copies of the released configs where we
could find one; where not, a comment says so.

Detection (:mod:`ldm_sdk.checkpoints.detect`) matches a checkpoint's structure against these configs, which
is why they matter: the number of attention heads is not visible in the weights.

Families whose networks are identical (``ldm-celebahq256``, ``ldm-ffhq256``, ``ldm-lsun-bedrooms``: same
network and schedule, different training data; ``sd2`` and ``sd2-v``: same network, eps vs v prediction)
cannot be told apart from weights; ``hints`` are lower-case substrings of the released file or folder names
that detection uses to choose between them when it is given a file name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ldm_sdk.checkpoints.original_config import config_from_yaml
from ldm_sdk.models.configs import ModelConfig, UNetConfig


@dataclass(frozen=True)
class Family:
    """A released model: ``config`` built from ``original_yaml`` (the ``model:`` section of ``yaml_name``)."""

    name: str
    description: str
    yaml_name: str
    source: str
    original_yaml: dict[str, Any]
    config: ModelConfig
    hints: tuple[str, ...] = ()


# -- building blocks, as the released configs write them ------------------------------------------------
# Each family's ``model:`` section is assembled from the shared blocks below with explicit overrides
# (:func:`_with`); :func:`_build` deep-copies every section, so no two families share a nested object.
_LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
_INPAINT = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
_UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_BERT = "ldm.modules.encoders.modules.BERTEmbedder"


def _with(base: dict[str, Any], *drop: str, **overrides: Any) -> dict[str, Any]:
    """``base`` without the keys ``drop`` and with ``overrides`` (a replaced key keeps its place)."""
    return {**{k: v for k, v in base.items() if k not in drop}, **overrides}


def _model(
    params: dict[str, Any], unet: dict[str, Any], first_stage: Any, cond_stage: Any, *, target: str = _LDM
) -> dict[str, Any]:
    """A ``model:`` section: ``target`` with the diffusion ``params``, the UNet's params and the first and
    cond stage configs."""
    return {
        "target": target,
        "params": {
            **params,
            "unet_config": {"target": _UNET, "params": unet},
            "first_stage_config": first_stage,
            "cond_stage_config": cond_stage,
        },
    }


# first stages, exactly as the LDM configs embed them
_KL_F8_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
_IDENTITY_LOSS = {"target": "torch.nn.Identity"}
#: the SD / LDM kl-f8 autoencoder (``first_stage_config`` of v1-inference.yaml and friends)
_KL_F8 = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "ddconfig": _KL_F8_DDCONFIG, "lossconfig": _IDENTITY_LOSS},
}
_VQ_F4_DDCONFIG = _with(_KL_F8_DDCONFIG, double_z=False, z_channels=3, ch_mult=[1, 2, 4])
#: the LDM vq-f4 autoencoder (``VQModelInterface``)
_VQ_F4 = {
    "target": "ldm.models.autoencoder.VQModelInterface",
    "params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": _VQ_F4_DDCONFIG, "lossconfig": _IDENTITY_LOSS},
}
#: vq-f4-noattn: ``attn_type: none``
_VQ_F4_NOATTN = {
    **_VQ_F4,
    "params": {**_VQ_F4["params"], "ddconfig": {"attn_type": "none", **_VQ_F4_DDCONFIG}},
}

# Stable Diffusion
#: the diffusion params shared by every SD 1.x / 2.x inference config
_SD_PARAMS: dict[str, Any] = {
    "linear_start": 0.00085,
    "linear_end": 0.0120,
    "num_timesteps_cond": 1,
    "log_every_t": 200,
    "timesteps": 1000,
    "first_stage_key": "jpg",
    "cond_stage_key": "txt",
    "image_size": 64,
    "channels": 4,
    "cond_stage_trainable": False,
    "conditioning_key": "crossattn",
    "monitor": "val/loss_simple_ema",
    "scale_factor": 0.18215,
    "use_ema": False,
}
_SD1_UNET: dict[str, Any] = {
    "image_size": 32,  # unused
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}
_SD2_UNET = _with(
    _SD1_UNET,
    "num_heads",
    num_head_channels=64,
    use_linear_in_transformer=True,
    context_dim=1024,
    use_fp16=True,
)
_CLIP = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
_OPENCLIP = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"freeze": True, "layer": "penultimate"},
}

# the LDM model zoo (CompVis/latent-diffusion): schedules differ per model, so each gives its linear_end
_LDM_PARAMS: dict[str, Any] = {"timesteps": 1000, "first_stage_key": "image", "linear_start": 0.0015}
#: the zoo's VQ-f4 models: 64 x 64 x 3 latents
_VQ_F4_PARAMS = _with(_LDM_PARAMS, image_size=64, channels=3)
_LDM_UNET: dict[str, Any] = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "attention_resolutions": [8, 4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 3, 4],
}
#: celeba256 / ffhq256 / lsun_beds256: the three files have the same ``model:`` section
_UNCOND_VQ_F4 = _model(
    _with(
        _VQ_F4_PARAMS,
        linear_end=0.0195,
        cond_stage_key="class_label",
        cond_stage_trainable=False,
        concat_mode=False,
    ),
    _with(_LDM_UNET, model_channels=224, num_head_channels=32),
    _VQ_F4,
    "__is_unconditional__",
)

# name -> (description, original file, where it was published, hints, model section)
_DATA: dict[str, tuple[str, str, str, tuple[str, ...], dict[str, Any]]] = {
    # ---- Stable Diffusion 1.x ----------------------------------------------------------------------
    "sd1": (
        "Stable Diffusion 1.x text-to-image (v1-1 ... v1-5), 512 px, CLIP ViT-L/14 text encoder",
        "v1-inference.yaml",
        "CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml",
        # first_stage ddconfig.resolution: 256 as we remember the release (a fork's copy says 512); it does
        # not change the network (no attention levels)
        (),
        _model(_SD_PARAMS, _SD1_UNET, _KL_F8, _CLIP),
    ),
    "sd1-inpaint": (
        "Stable Diffusion 1.5 inpainting (RunwayML): 9 input channels = latent, mask, masked-image latent",
        "v1-inpainting-inference.yaml",
        "runwayml/stable-diffusion configs/stable-diffusion/v1-inpainting-inference.yaml",
        (),
        _model(
            # no use_ema key in this file: the DDPM default (True) applies
            _with(_SD_PARAMS, "use_ema", conditioning_key="hybrid", finetune_keys=None),
            _with(_SD1_UNET, in_channels=9),
            _KL_F8,
            _CLIP,
            target=_INPAINT,
        ),
    ),
    # ---- Stable Diffusion 2.x ----------------------------------------------------------------------
    "sd2": (
        "Stable Diffusion 2.x base, eps-prediction (512-base, v2-1_512), OpenCLIP ViT-H/14 text encoder",
        "v2-inference.yaml",
        "Stability-AI/stablediffusion configs/stable-diffusion/v2-inference.yaml",
        ("512-base", "v2-1_512", "512"),
        _model(_SD_PARAMS, _SD2_UNET, _KL_F8, _OPENCLIP),
    ),
    "sd2-v": (
        "Stable Diffusion 2.x 768, v-prediction (768-v, v2-1_768), OpenCLIP ViT-H/14 text encoder",
        "v2-inference-v.yaml",
        "Stability-AI/stablediffusion configs/stable-diffusion/v2-inference-v.yaml",
        ("768-v", "v2-1_768", "768"),
        _model({"parameterization": "v", **_SD_PARAMS}, _SD2_UNET, _KL_F8, _OPENCLIP),
    ),
    "sd2-inpaint": (
        "Stable Diffusion 2 inpainting (512-inpainting-ema), eps-prediction, 9 input channels",
        "v2-inpainting-inference.yaml",
        "Stability-AI/stablediffusion configs/stable-diffusion/v2-inpainting-inference.yaml",
        (),
        _model(
            _with(_SD_PARAMS, conditioning_key="hybrid", finetune_keys=None),
            # v2-inpainting-inference.yaml does not set use_fp16
            _with(_SD2_UNET, "use_fp16", in_channels=9),
            _KL_F8,
            _OPENCLIP,
            target=_INPAINT,
        ),
    ),
    # ---- LDM model zoo (CompVis/latent-diffusion) ------------------------------------------------------
    "ldm-cin256": (
        "LDM-VQ-4 class-conditional ImageNet 256 (cin256-v2), class embedding by cross-attention",
        "cin256-v2.yaml",
        "CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml",
        (),
        _model(
            _with(
                _VQ_F4_PARAMS,
                linear_end=0.0195,
                cond_stage_key="class_label",
                cond_stage_trainable=True,
                conditioning_key="crossattn",
                use_ema=False,
            ),
            _with(
                _LDM_UNET,
                model_channels=192,
                channel_mult=[1, 2, 3, 5],
                num_heads=1,
                use_spatial_transformer=True,
                transformer_depth=1,
                context_dim=512,
            ),
            _VQ_F4,
            {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"},
            },
        ),
    ),
    "ldm-txt2img-kl8": (
        "LDM-KL-8-G text-to-image (1.45B, LAION-400M), BERT-style transformer trained jointly",
        "txt2img-1p4B-eval.yaml",
        "CompVis/latent-diffusion configs/latent-diffusion/txt2img-1p4B-eval.yaml",
        (),
        _model(
            _with(
                _LDM_PARAMS,
                linear_start=0.00085,
                linear_end=0.012,
                cond_stage_key="caption",
                image_size=32,
                channels=4,
                cond_stage_trainable=True,
                conditioning_key="crossattn",
                scale_factor=0.18215,
                use_ema=False,
            ),
            # the UNet SD 1.x took over, with a 1280-wide context
            _with(_SD1_UNET, context_dim=1280),
            _KL_F8,
            {"target": _BERT, "params": {"n_embed": 1280, "n_layer": 32}},
        ),
    ),
    "ldm-sr-bsr": (
        "LDM-BSR x4 super-resolution (bsr_sr), low-res image concatenated to the latent",
        "models/ldm/bsr_sr/config.yaml",
        "CompVis/latent-diffusion models/ldm/bsr_sr/config.yaml",
        (),
        _model(
            _with(
                _VQ_F4_PARAMS,
                linear_end=0.0155,
                loss_type="l2",
                cond_stage_key="LR_image",
                concat_mode=True,
                cond_stage_trainable=False,
            ),
            _with(
                _LDM_UNET,
                in_channels=6,
                model_channels=160,
                attention_resolutions=[16, 8],
                channel_mult=[1, 2, 2, 4],
                num_head_channels=32,
            ),
            _VQ_F4,
            {"target": "torch.nn.Identity"},
        ),
    ),
    "ldm-inpaint": (
        "LDM inpainting (inpainting_big, Places), masked image and mask concatenated to the latent",
        "models/ldm/inpainting_big/config.yaml",
        "CompVis/latent-diffusion models/ldm/inpainting_big/config.yaml",
        (),
        _model(
            _with(
                _VQ_F4_PARAMS,
                linear_end=0.0205,
                loss_type="l1",
                cond_stage_key="masked_image",
                concat_mode=True,
            ),
            _with(_LDM_UNET, in_channels=7, model_channels=256, num_heads=8, resblock_updown=True),
            _VQ_F4_NOATTN,
            "__is_first_stage__",
        ),
    ),
    "ldm-semantic": (
        "LDM semantic synthesis (landscapes, 182 COCO-Stuff classes), rescaled map concatenated",
        "models/ldm/semantic_synthesis256/config.yaml",
        "CompVis/latent-diffusion models/ldm/semantic_synthesis256/config.yaml",
        (),
        _model(
            _with(
                _VQ_F4_PARAMS,
                linear_end=0.0205,
                loss_type="l1",
                cond_stage_key="segmentation",
                concat_mode=True,
                cond_stage_trainable=True,
            ),
            # the attention_resolutions (32, 16, 8) are never reached with three levels: the only attention
            # is the middle block's (as in the released file)
            _with(
                _LDM_UNET,
                in_channels=6,
                model_channels=128,
                attention_resolutions=[32, 16, 8],
                channel_mult=[1, 4, 8],
                num_heads=8,
            ),
            _VQ_F4,
            {
                "target": "ldm.modules.encoders.modules.SpatialRescaler",
                "params": {"n_stages": 2, "in_channels": 182, "out_channels": 3},
            },
        ),
    ),
    "ldm-layout": (
        "LDM layout-to-image (OpenImages 256): box tokens through a jointly trained transformer",
        "models/ldm/layout2img-openimages256/config.yaml",
        "CompVis/latent-diffusion models/ldm/layout2img-openimages256/config.yaml",
        (),
        _model(
            _with(
                _VQ_F4_PARAMS,
                linear_end=0.0205,
                loss_type="l1",
                cond_stage_key="coordinates_bbox",
                conditioning_key="crossattn",
                cond_stage_trainable=True,
            ),
            _with(
                _LDM_UNET,
                model_channels=128,
                num_head_channels=32,
                use_spatial_transformer=True,
                transformer_depth=3,
                context_dim=512,
            ),
            _VQ_F4,
            {
                "target": _BERT,
                "params": {
                    "n_embed": 512,
                    "n_layer": 16,
                    "vocab_size": 8192,
                    "max_seq_len": 92,
                    "use_tokenizer": False,
                },
            },
        ),
    ),
    "ldm-lsun-churches": (
        "LDM-KL-8 unconditional LSUN-Churches 256 (scale_by_std: scale_factor is in the checkpoint)",
        "models/ldm/lsun_churches256/config.yaml",
        "CompVis/latent-diffusion models/ldm/lsun_churches256/config.yaml",
        ("church",),
        _model(
            _with(
                _LDM_PARAMS,
                linear_end=0.0155,
                loss_type="l1",
                cond_stage_key="image",
                image_size=32,
                channels=4,
                cond_stage_trainable=False,
                concat_mode=False,
                scale_by_std=True,
            ),
            _with(
                _LDM_UNET,
                image_size=32,
                in_channels=4,
                out_channels=4,
                model_channels=192,
                attention_resolutions=[1, 2, 4, 8],
                channel_mult=[1, 2, 2, 4, 4],
                num_heads=8,
                use_scale_shift_norm=True,
                resblock_updown=True,
            ),
            _KL_F8,
            "__is_unconditional__",
        ),
    ),
    "ldm-celebahq256": (
        "LDM-VQ-4 unconditional CelebA-HQ 256",
        "models/ldm/celeba256/config.yaml",
        "CompVis/latent-diffusion models/ldm/celeba256/config.yaml",
        ("celeba",),
        _UNCOND_VQ_F4,
    ),
    "ldm-ffhq256": (
        "LDM-VQ-4 unconditional FFHQ 256",
        "models/ldm/ffhq256/config.yaml",
        "CompVis/latent-diffusion models/ldm/ffhq256/config.yaml",
        ("ffhq",),
        _UNCOND_VQ_F4,
    ),
    "ldm-lsun-bedrooms": (
        "LDM-VQ-4 unconditional LSUN-Bedrooms 256",
        "models/ldm/lsun_beds256/config.yaml",
        "CompVis/latent-diffusion models/ldm/lsun_beds256/config.yaml",
        ("bed",),
        _UNCOND_VQ_F4,
    ),
}


def _build() -> dict[str, Family]:
    families: dict[str, Family] = {}
    for name, (description, yaml_name, source, hints, model) in _DATA.items():
        original = {"model": copy.deepcopy(model)}
        families[name] = Family(
            name=name,
            description=description,
            yaml_name=yaml_name,
            source=source,
            original_yaml=original,
            config=config_from_yaml(original, family=name),
            hints=hints,
        )
    return families


FAMILIES: dict[str, Family] = _build()


def get_family(name: str) -> Family:
    """The family called ``name``; an unknown name raises with the list of known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


# -- matching a config against the families ------------------------------------------------------------
# Fields that do not change what a loaded model computes (training, logging, nominal sizes).
_UNET_NON_INFERENCE = {"image_size", "use_checkpoint", "use_fp16", "dropout"}
_DIFFUSION_NON_INFERENCE = {
    "loss_type",
    "l_simple_weight",
    "original_elbo_weight",
    "learn_logvar",
    "logvar_init",
    "first_stage_key",
    "cond_stage_key",
    "cond_stage_trainable",
    "use_ema",
    "image_size",
}


def unet_attention_levels(attention_resolutions: tuple[int, ...], levels: int) -> tuple[int, ...]:
    """UNet levels with attention: level ``i`` runs at downsampling factor ``2**i``."""
    return tuple(i for i in range(levels) if 2**i in attention_resolutions)


def first_stage_attention_levels(
    attn_resolutions: tuple[int, ...], levels: int, resolution: int
) -> tuple[int, ...]:
    """Autoencoder levels with attention: level ``i`` runs at ``resolution // 2**i`` pixels."""
    return tuple(i for i in range(levels) if resolution // 2**i in attn_resolutions)


def spatial_heads(u: UNetConfig, width: int) -> tuple[int, int]:
    """(heads, width per head) of a SpatialTransformer at ``width`` channels, as the CompVis UNet computes."""
    if u.num_head_channels == -1:
        heads, dim = u.num_heads, width // u.num_heads
    else:
        heads, dim = max(width // u.num_head_channels, 1), u.num_head_channels
    if u.legacy:
        dim = width // heads
    return heads, dim


def inference_signature(config: ModelConfig, *, with_cond_stage: bool = True) -> dict[str, Any]:
    """What determines a model's computation: its config without training-only fields, attention given as
    the levels it really happens at. Two configs with equal signatures load and run the same weights alike."""
    sig: dict[str, Any] = {}
    dd = config.first_stage.ddconfig
    fs = config.first_stage.model_dump(exclude={"ddconfig"})
    fs["ddconfig"] = dd.model_dump(exclude={"dropout", "resolution", "attn_resolutions"})
    fs["ddconfig"]["attention_levels"] = first_stage_attention_levels(
        dd.attn_resolutions, len(dd.ch_mult), dd.resolution
    )
    sig["first_stage"] = fs
    if config.unet is not None and config.diffusion is not None:
        unet = config.unet.model_dump(exclude=_UNET_NON_INFERENCE | {"attention_resolutions"})
        unet["attention_levels"] = unet_attention_levels(
            config.unet.attention_resolutions, len(config.unet.channel_mult)
        )
        if unet["num_heads_upsample"] in (-1, unet["num_heads"]):
            unet["num_heads_upsample"] = -1
        if config.unet.use_spatial_transformer:
            # equivalent head settings (num_heads, num_head_channels, legacy) -> (heads, width) per level
            for key in (
                "num_heads",
                "num_head_channels",
                "num_heads_upsample",
                "legacy",
                "use_new_attention_order",
            ):
                del unet[key]
            unet["heads"] = tuple(
                spatial_heads(config.unet, config.unet.model_channels * m) for m in config.unet.channel_mult
            )
        sig["unet"] = unet
        sig["diffusion"] = config.diffusion.model_dump(exclude=_DIFFUSION_NON_INFERENCE)
        if with_cond_stage:
            sig["cond_stage"] = None if config.cond_stage is None else config.cond_stage.model_dump()
    return sig


def matching_families(config: ModelConfig, *, with_cond_stage: bool = True) -> list[str]:
    """Families whose inference signature equals ``config``'s (several when their networks coincide)."""
    sig = inference_signature(config, with_cond_stage=with_cond_stage)
    return [
        name
        for name, fam in FAMILIES.items()
        if inference_signature(fam.config, with_cond_stage=with_cond_stage) == sig
    ]


def match_family(config: ModelConfig, *, with_cond_stage: bool = True) -> str | None:
    """The one family ``config`` is an instance of, or None (no family, or several equally good)."""
    names = matching_families(config, with_cond_stage=with_cond_stage)
    return names[0] if len(names) == 1 else None
