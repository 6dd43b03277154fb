"""Tiny random-weight models of the large-image tasks (upscale, semantic, layout), for CPU tests in seconds.

All use the tiny VQ-f4 first stage (3 latent channels) and a two-level UNet (size multiple 4 x 2 = 8):

- ``SR``: LDM ``bsr_sr``-like, ``concat`` with the low-res image (UNet input 3 + 3), cond stage
  ``torch.nn.Identity`` (:class:`~ldm_sdk.encoders.lowres.LowResImage`), purely convolutional.
- ``SEMANTIC``: ``semantic_synthesis256``-like: ``concat`` with a :class:`SpatialRescaler` map (``n_stages``
  2, 5 classes -> 3 channels), "trained" at 256x256 (``image_size`` 64), purely convolutional.
- ``LAYOUT``: ``layout2img``-like: ``crossattn`` with a :class:`LayoutEncoder` (``n_layer`` 1, 32 wide,
  4 objects + crop = 14 tokens, 1030-token vocabulary); like the original config, the cond stage params do
  not say ``n_object_classes`` (the task takes it: :data:`LAYOUT_CLASSES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import CondStageConfig, DiffusionConfig, ModelConfig, UNetConfig
from ldm_sdk.testing.tiny import TINY_VQ_F4, random_bundle, tiny_ldm_diffusion, tiny_unet

SEMANTIC_CLASSES = 5
LAYOUT_CLASSES = 6
LAYOUT_PARAMS: dict[str, Any] = {
    "n_embed": 32,
    "n_layer": 1,
    "vocab_size": 1030,
    "max_seq_len": 14,
    "use_tokenizer": False,
}


def _unet(in_ch: int, **kw: Any) -> UNetConfig:
    return tiny_unet(in_ch, 3, **{"attention_resolutions": (), "num_head_channels": 16, **kw})


def _diffusion(key: str, cond_key: str, image_size: int = 8) -> DiffusionConfig:
    return tiny_ldm_diffusion(
        linear_end=0.0155, image_size=image_size, conditioning_key=key, cond_stage_key=cond_key
    )


SR = ModelConfig(
    family="tiny-ldm-sr",
    first_stage=TINY_VQ_F4,
    unet=_unet(6),
    diffusion=_diffusion("concat", "LR_image"),
    cond_stage=CondStageConfig(target="torch.nn.Identity"),
)
SEMANTIC = ModelConfig(
    family="tiny-ldm-semantic",
    first_stage=TINY_VQ_F4,
    unet=_unet(6, image_size=64),
    diffusion=_diffusion("concat", "segmentation", image_size=64),
    cond_stage=CondStageConfig(
        target="ldm.modules.encoders.modules.SpatialRescaler",
        params={"n_stages": 2, "in_channels": SEMANTIC_CLASSES, "out_channels": 3},
    ),
)
LAYOUT = ModelConfig(
    family="tiny-ldm-layout",
    first_stage=TINY_VQ_F4,
    unet=_unet(3, attention_resolutions=(1,), use_spatial_transformer=True, context_dim=32),
    diffusion=_diffusion("crossattn", "coordinates_bbox"),
    cond_stage=CondStageConfig(
        target="ldm.modules.encoders.modules.BERTEmbedder", params=dict(LAYOUT_PARAMS)
    ),
)
CONFIGS: dict[str, ModelConfig] = {"sr": SR, "semantic": SEMANTIC, "layout": LAYOUT}


def tiny_bundle(name: str, seed: int = 0) -> ModelBundle:
    """A random-weight bundle of ``CONFIGS[name]`` whose cond stage weights load into the real encoder."""
    config = CONFIGS[name]
    bundle = random_bundle(config, seed=seed).eval()
    torch.manual_seed(seed + 1)
    if name == "semantic":
        from ldm_sdk.encoders.semantic import SpatialRescaler

        encoder: torch.nn.Module = SpatialRescaler(**config.cond_stage.params)  # type: ignore[union-attr,arg-type]
    elif name == "layout":
        from ldm_sdk.encoders.layout import LayoutEncoder

        encoder = LayoutEncoder(**LAYOUT_PARAMS, n_object_classes=LAYOUT_CLASSES)
    else:
        encoder = torch.nn.Identity()
    bundle.cond_stage_weights = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    return bundle


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """``tiny_bundle(name)`` written as ``<folder>/<name>.safetensors`` (config embedded)."""
    return save(tiny_bundle(name, seed), folder / f"{name}.safetensors")
