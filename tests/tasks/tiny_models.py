"""Tiny random-weight models for the task tests, each with a cond stage that really encodes (CPU, seconds).

- ``TXT``: SD-1-like text-to-image (KL-f8, crossattn) whose cond stage is LDM's BERTEmbedder with one layer
  and 16 tokens (its WordPiece tokenizer works offline).
- ``SD_INPAINT_TXT``: SD-inpainting-like (hybrid, UNet input 4 + 1 + 4) with the same text encoder.
- ``LDM_INPAINT``: LDM-inpainting-like (VQ-f4, concat, UNet input 3 + 3 + 1, cond stage = first stage).
- ``CLASS`` / ``UNCOND``: the tiny class-conditional and unconditional LDMs of ``ldm_sdk.testing.tiny``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import CondStageConfig, DiffusionConfig, ModelConfig, UNetConfig
from ldm_sdk.testing.tiny import LDM_KL_F4_UNCOND, LDM_VQ_F4_CLASS, TINY_KL_F8, TINY_VQ_F4, random_bundle

BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
BERT_PARAMS: dict[str, object] = {"n_embed": 32, "n_layer": 1, "max_seq_len": 16}
MAX_TOKENS = 16


def _unet(in_ch: int, out_ch: int, **kw: Any) -> UNetConfig:
    base: dict[str, Any] = {
        "image_size": 8,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "model_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": (1,),
        "channel_mult": (1, 2),
        "num_head_channels": 16,
    }
    base.update(kw)
    return UNetConfig.model_validate(base)


def _sd_diffusion(key: str) -> DiffusionConfig:
    return DiffusionConfig(
        linear_start=0.00085,
        linear_end=0.012,
        image_size=8,
        channels=4,
        conditioning_key=key,
        cond_stage_key="caption",
        scale_factor=0.18215,
    )


TXT = ModelConfig(
    family="tiny-txt2img-bert",
    first_stage=TINY_KL_F8,
    unet=_unet(4, 4, use_spatial_transformer=True, context_dim=32, legacy=False),
    diffusion=_sd_diffusion("crossattn"),
    cond_stage=CondStageConfig(target=BERT_TARGET, params=dict(BERT_PARAMS)),
)
SD_INPAINT_TXT = ModelConfig(
    family="tiny-sd-inpaint-bert",
    first_stage=TINY_KL_F8,
    unet=_unet(9, 4, use_spatial_transformer=True, context_dim=32, legacy=False),
    diffusion=_sd_diffusion("hybrid"),
    cond_stage=CondStageConfig(target=BERT_TARGET, params=dict(BERT_PARAMS)),
)
LDM_INPAINT = ModelConfig(
    family="tiny-ldm-inpaint",
    first_stage=TINY_VQ_F4,
    unet=_unet(7, 3, attention_resolutions=()),
    diffusion=DiffusionConfig(
        linear_start=0.0015,
        linear_end=0.0205,
        image_size=8,
        channels=3,
        conditioning_key="concat",
        cond_stage_key="masked_image",
    ),
    cond_stage=CondStageConfig(target="__is_first_stage__"),
)
CLASS = LDM_VQ_F4_CLASS
UNCOND = LDM_KL_F4_UNCOND

CONFIGS: dict[str, ModelConfig] = {
    "txt": TXT,
    "sd_inpaint": SD_INPAINT_TXT,
    "ldm_inpaint": LDM_INPAINT,
    "class": CLASS,
    "uncond": UNCOND,
}


def tiny_bundle(name: str, seed: int = 0) -> ModelBundle:
    """A random-weight bundle of ``CONFIGS[name]`` whose cond stage weights load into the real encoder."""
    config = CONFIGS[name]
    bundle = random_bundle(config, seed=seed).eval()
    if config.cond_stage is not None and config.cond_stage.target == BERT_TARGET:
        from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder

        torch.manual_seed(seed + 1)
        encoder = BERTEmbedder(**config.cond_stage.params)  # type: ignore[arg-type]
        bundle.cond_stage_weights = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    elif config.cond_stage is not None and config.cond_stage.target == "__is_first_stage__":
        bundle.cond_stage_weights = {}
    return bundle


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """``tiny_bundle(name)`` written as ``<folder>/<name>.safetensors`` (config embedded)."""
    return save(tiny_bundle(name, seed), folder / f"{name}.safetensors")
