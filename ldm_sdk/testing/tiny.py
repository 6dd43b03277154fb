"""Tiny, width-shrunk ModelConfigs of every model family the SDK supports, for CPU tests in seconds.

Each mirrors the *structure* of its original (conditioning key, parameterization, first-stage kind and
factor, linear vs conv transformer projections, input channels) with widths cut to the minimum CompVis'
GroupNorm(32) allows. The one source for the SDK's own tests (``tests/tiny_configs.py`` re-exports it)
and for plugin authors (the ``tiny_bundle`` / ``tiny_sd_bundle`` fixtures of the ``ldm_sdk`` pytest
plugin, :mod:`ldm_sdk.testing.pytest_plugin`).

- ``SD1``: SD 1.x-like, KL-f8, crossattn (context 32), eps, 1x1-conv transformer projections.
- ``SD2_V``: SD 2.x-like, KL-f8, crossattn (context 48), v-param, linear projections, num_head_channels.
- ``SD_INPAINT``: SD-inpainting-like, 9 UNet input channels (latent + mask + masked image), hybrid.
- ``LDM_KL_F4_UNCOND``: LDM unconditional (CelebA/FFHQ-like), KL-f4, plain attention blocks, no cond stage.
- ``LDM_VQ_F4_CLASS``: LDM class-conditional (cin256-like), VQ-f4, ClassEmbedder through cross-attention.
- ``KL_F8_FIRST_STAGE``: a first-stage-only (autoencoder) file, KL-f8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ldm_sdk.models.configs import (
    AutoencoderKLConfig,
    CondStageConfig,
    DDConfig,
    DiffusionConfig,
    ModelConfig,
    UNetConfig,
    VQModelConfig,
)

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle


def _dd(z: int, ch_mult: tuple[int, ...], *, kl: bool) -> DDConfig:
    return DDConfig(
        double_z=kl,
        z_channels=z,
        resolution=32,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=ch_mult,
        num_res_blocks=1,
        attn_resolutions=(),
    )


TINY_KL_F8 = AutoencoderKLConfig(ddconfig=_dd(4, (1, 1, 1, 1), kl=True), embed_dim=4)
TINY_KL_F4 = AutoencoderKLConfig(ddconfig=_dd(3, (1, 1, 2), kl=True), embed_dim=3)
TINY_VQ_F4 = VQModelConfig(ddconfig=_dd(3, (1, 1, 2), kl=False), n_embed=16, embed_dim=3)


def tiny_unet(in_ch: int, out_ch: int, **kw: object) -> UNetConfig:
    """A two-level, 32-channel UNet config (one res block, attention at the first level); ``kw`` overrides."""
    base: dict[str, object] = {
        "image_size": 8,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "model_channels": 32,
        "num_res_blocks": 1,
        "attention_resolutions": (1,),
        "channel_mult": (1, 2),
    }
    base.update(kw)
    return UNetConfig.model_validate(base)


def tiny_sd_diffusion(**kw: object) -> DiffusionConfig:
    """The diffusion settings of Stable Diffusion (schedule, keys, scale factor) at an 8x8 latent."""
    base: dict[str, object] = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 8,
        "channels": 4,
        "conditioning_key": "crossattn",
        "scale_factor": 0.18215,
        "use_ema": False,
    }
    base.update(kw)
    return DiffusionConfig.model_validate(base)


def tiny_ldm_diffusion(**kw: object) -> DiffusionConfig:
    """The diffusion settings of an LDM-zoo model (schedule 0.0015..0.0195, 3 latent channels) at an 8x8
    latent; ``kw`` overrides (``conditioning_key``, ``cond_stage_key``, ``linear_end`` ...)."""
    base: dict[str, object] = {"linear_start": 0.0015, "linear_end": 0.0195, "image_size": 8, "channels": 3}
    base.update(kw)
    return DiffusionConfig.model_validate(base)


CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"

SD1 = ModelConfig(
    family="tiny-sd1",
    first_stage=TINY_KL_F8,
    unet=tiny_unet(4, 4, num_heads=2, use_spatial_transformer=True, context_dim=32, legacy=False),
    diffusion=tiny_sd_diffusion(),
    cond_stage=CondStageConfig(target=CLIP_TARGET),
)
SD2_V = ModelConfig(
    family="tiny-sd2-v",
    first_stage=TINY_KL_F8,
    unet=tiny_unet(
        4,
        4,
        num_head_channels=16,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        context_dim=48,
        legacy=False,
    ),
    diffusion=tiny_sd_diffusion(parameterization="v"),
    cond_stage=CondStageConfig(target=OPENCLIP_TARGET, params={"freeze": True, "layer": "penultimate"}),
)
SD_INPAINT = ModelConfig(
    family="tiny-sd1-inpainting",
    first_stage=TINY_KL_F8,
    unet=tiny_unet(9, 4, num_heads=2, use_spatial_transformer=True, context_dim=32, legacy=False),
    diffusion=tiny_sd_diffusion(conditioning_key="hybrid"),
    cond_stage=CondStageConfig(target=CLIP_TARGET),
)
LDM_KL_F4_UNCOND = ModelConfig(
    family="tiny-ldm-kl-f4-uncond",
    first_stage=TINY_KL_F4,
    unet=tiny_unet(3, 3, attention_resolutions=(2,), num_head_channels=16),
    diffusion=tiny_ldm_diffusion(conditioning_key=None),
)
LDM_VQ_F4_CLASS = ModelConfig(
    family="tiny-ldm-vq-f4-cin",
    first_stage=TINY_VQ_F4,
    unet=tiny_unet(
        3, 3, attention_resolutions=(1, 2), num_head_channels=16, use_spatial_transformer=True, context_dim=32
    ),
    diffusion=tiny_ldm_diffusion(
        conditioning_key="crossattn", cond_stage_key="class_label", cond_stage_trainable=True
    ),
    cond_stage=CondStageConfig(
        target=CLASS_TARGET, params={"embed_dim": 32, "n_classes": 10, "key": "class_label"}
    ),
)
KL_F8_FIRST_STAGE = ModelConfig(family="tiny-kl-f8", first_stage=TINY_KL_F8)

ALL: dict[str, ModelConfig] = {
    "sd1": SD1,
    "sd2_v": SD2_V,
    "sd_inpaint": SD_INPAINT,
    "ldm_kl_f4_uncond": LDM_KL_F4_UNCOND,
    "ldm_vq_f4_class": LDM_VQ_F4_CLASS,
    "kl_f8_first_stage": KL_F8_FIRST_STAGE,
}


def fake_cond_stage_weights(config: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """A few stand-in ``cond_stage_model.*`` tensors (prefix stripped) shaped like the family's encoder."""
    if config.cond_stage is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    if config.cond_stage.target == CLASS_TARGET:
        n_classes, embed_dim = (cast(int, config.cond_stage.params[k]) for k in ("n_classes", "embed_dim"))
        return {"embedding.weight": torch.randn(n_classes, embed_dim, generator=g)}
    width = config.unet.context_dim if config.unet is not None and config.unet.context_dim else 32
    return {
        "transformer.text_model.embeddings.token_embedding.weight": torch.randn(20, width, generator=g),
        "transformer.text_model.final_layer_norm.weight": torch.randn(width, generator=g),
    }


def random_bundle(config: ModelConfig, seed: int = 0, *, ema: bool = False) -> ModelBundle:
    """A ModelBundle of ``config`` with every parameter random (not the default init), plus stand-in
    conditioning weights; ``ema`` adds an EMA copy that differs from the live weights."""
    from ldm_sdk.checkpoints.bundle import ModelBundle

    torch.manual_seed(seed)
    bundle = ModelBundle(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bundle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    bundle.cond_stage_weights = fake_cond_stage_weights(config, seed)
    if ema:
        bundle.snapshot_ema(decay=0.999, num_updates=5)
        for value in bundle.ema_weights.values():
            if value.is_floating_point() and value.ndim > 0:
                value.add_(torch.randn(value.shape, generator=g) * 0.2)
    return bundle


__all__ = [
    "ALL",
    "CLASS_TARGET",
    "CLIP_TARGET",
    "KL_F8_FIRST_STAGE",
    "LDM_KL_F4_UNCOND",
    "LDM_VQ_F4_CLASS",
    "OPENCLIP_TARGET",
    "SD1",
    "SD2_V",
    "SD_INPAINT",
    "TINY_KL_F4",
    "TINY_KL_F8",
    "TINY_VQ_F4",
    "fake_cond_stage_weights",
    "random_bundle",
    "tiny_ldm_diffusion",
    "tiny_sd_diffusion",
    "tiny_unet",
]
