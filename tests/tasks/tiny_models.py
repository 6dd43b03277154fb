"""Tiny random-weight models for the task tests, each with a cond stage that really encodes (CPU, seconds).

- ``TXT``: SD-1-like text-to-image (KL-f8, crossattn) whose cond stage is LDM's BERTEmbedder with one layer
  and 16 tokens (its WordPiece tokenizer works offline).
- ``SD_INPAINT_TXT``: SD-inpainting-like (hybrid, UNet input 4 + 1 + 4) with the same text encoder.
- ``LDM_INPAINT``: LDM-inpainting-like (VQ-f4, concat, UNet input 3 + 3 + 1, cond stage = first stage).
- ``CLASS`` / ``UNCOND``: the tiny class-conditional and unconditional LDMs of ``ldm_sdk.testing.tiny``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import CondStageConfig, ModelConfig
from ldm_sdk.testing.tiny import (
    LDM_KL_F4_UNCOND,
    LDM_VQ_F4_CLASS,
    TINY_KL_F8,
    TINY_VQ_F4,
    random_bundle,
    tiny_ldm_diffusion,
    tiny_sd_diffusion,
    tiny_unet,
)

BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
BERT_PARAMS: dict[str, object] = {"n_embed": 32, "n_layer": 1, "max_seq_len": 16}
MAX_TOKENS = 16


def _bert_text_model(family: str, unet_in: int, conditioning_key: str) -> ModelConfig:
    """SD-1-like (KL-f8, Stable Diffusion's schedule) with the one-layer BERT text encoder; the keys and
    ``use_ema`` keep the DiffusionConfig defaults."""
    return ModelConfig(
        family=family,
        first_stage=TINY_KL_F8,
        unet=tiny_unet(
            unet_in, 4, num_head_channels=16, use_spatial_transformer=True, context_dim=32, legacy=False
        ),
        diffusion=tiny_sd_diffusion(
            conditioning_key=conditioning_key, cond_stage_key="caption", first_stage_key="image", use_ema=True
        ),
        cond_stage=CondStageConfig(target=BERT_TARGET, params=dict(BERT_PARAMS)),
    )


TXT = _bert_text_model("tiny-txt2img-bert", 4, "crossattn")
SD_INPAINT_TXT = _bert_text_model("tiny-sd-inpaint-bert", 9, "hybrid")
LDM_INPAINT = ModelConfig(
    family="tiny-ldm-inpaint",
    first_stage=TINY_VQ_F4,
    unet=tiny_unet(7, 3, attention_resolutions=(), num_head_channels=16),
    diffusion=tiny_ldm_diffusion(linear_end=0.0205, conditioning_key="concat", cond_stage_key="masked_image"),
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
