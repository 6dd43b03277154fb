"""Networks per factor: the UNet matched in parameter count to the f=1 reference, training FLOPs, and the
first-stage / LDM configs handed to the trainers."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ldm_sdk.models.configs import (
    AutoencoderKLConfig,
    CondStageConfig,
    DDConfig,
    DiffusionConfig,
    ModelConfig,
    UNetConfig,
)

from .presets import AE_CH_MULT, FACTORS, LATENT_CHANNELS, MULT_PATTERNS, Preset

CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"


# -- model configs ------------------------------------------------------------------------------------------
def latent_size(preset: Preset, f: int) -> int:
    if f not in FACTORS:
        raise ValueError(f"factor {f} is not one of {list(FACTORS)}")
    if preset.image_size % f:
        raise ValueError(f"image size {preset.image_size} is not a multiple of the factor {f}")
    return preset.image_size // f


def unet_levels(preset: Preset, f: int) -> int:
    """Levels of the UNet at factor ``f``: halve while the smallest map stays >= ``min_feature`` pixels."""
    s = latent_size(preset, f)
    levels = 1
    while levels < preset.max_levels and s >> levels >= preset.min_feature:
        levels += 1
    return levels


def unet_config(
    preset: Preset, f: int, model_channels: int, channel_mult: tuple[int, ...], res_blocks: int, depth: int
) -> UNetConfig:
    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    attention = tuple(2**i for i in range(len(channel_mult)) if s >> i <= preset.attn_max_size)
    return UNetConfig(
        image_size=s,
        in_channels=c,
        out_channels=c,
        model_channels=model_channels,
        num_res_blocks=res_blocks,
        attention_resolutions=attention,
        channel_mult=channel_mult,
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=depth,
        context_dim=preset.context_dim,
        legacy=False,
    )


@functools.lru_cache(maxsize=4096)
def _count(config_json: str) -> int:
    from ldm_sdk.models.unet import UNetModel

    config = UNetConfig.model_validate_json(config_json)
    with torch.device("meta"):
        model = UNetModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def count_parameters(config: UNetConfig) -> int:
    """Parameters of the UNet ``config`` builds (on the meta device: no memory, no init)."""
    return _count(config.model_dump_json())


def reference_unet(preset: Preset) -> UNetConfig:
    """The f=1 (pixel-space) UNet whose parameter count every factor matches."""
    levels = unet_levels(preset, 1)
    return unet_config(preset, 1, preset.unet_channels, MULT_PATTERNS[levels][0], preset.unet_res_blocks, 1)


@dataclass(frozen=True)
class UNetDesign:
    factor: int
    config: UNetConfig
    params: int
    target: int

    @property
    def rel_diff(self) -> float:
        return self.params / self.target - 1.0


def design_unet(preset: Preset, f: int) -> UNetDesign:
    """The UNet of factor ``f``, its parameter count matched to :func:`reference_unet`'s.

    Levels follow the latent size (:func:`unet_levels`); attention sits at the levels whose maps are at
    most ``attn_max_size`` pixels. Structures are tried in a fixed order (res blocks: the reference's, then
    2, 1, 3; transformer depth 1, then 2; the level count's ``channel_mult`` patterns, reference first), and
    for each the ``model_channels`` (a multiple of 32, for GroupNorm(32) and 32-channel heads) closest to
    the target by bisection. The first structure within half the tolerance wins; else the closest of all.
    """
    target = count_parameters(reference_unet(preset))
    levels = unet_levels(preset, f)
    blocks = [preset.unet_res_blocks, *(b for b in (2, 1, 3) if b != preset.unet_res_blocks)]
    best: UNetDesign | None = None
    for depth in (1, 2):
        for res_blocks in blocks:
            for mult in MULT_PATTERNS[levels]:

                def build(
                    k: int, mult: tuple[int, ...] = mult, rb: int = res_blocks, d: int = depth
                ) -> UNetConfig:
                    return unet_config(preset, f, 32 * k, mult, rb, d)

                lo, hi = 1, 64  # model_channels 32 .. 2048
                while hi - lo > 1:  # the largest k whose count is <= target (counts grow with k)
                    mid = (lo + hi) // 2
                    if count_parameters(build(mid)) <= target:
                        lo = mid
                    else:
                        hi = mid
                for k in (lo, hi):
                    cfg = build(k)
                    design = UNetDesign(f, cfg, count_parameters(cfg), target)
                    if best is None or abs(design.rel_diff) < abs(best.rel_diff):
                        best = design
                if best is not None and abs(best.rel_diff) <= preset.param_tolerance / 2:
                    return best
    assert best is not None
    return best


def training_flops(preset: Preset, f: int, unet: UNetConfig) -> dict[str, float]:
    """Counted (not measured) GFLOPs per image: the UNet forward at the latent size, the first-stage encoder
    forward (what a training step runs besides the UNet), and a training sample ~ 3 x UNet + encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.unet import UNetModel

    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    with torch.device("meta"):
        model = UNetModel.from_config(unet)
        x, t, ctx = torch.zeros(1, c, s, s), torch.zeros(1), torch.zeros(1, 1, preset.context_dim)
        with FlopCounterMode(display=False) as counter:
            model(x, t, ctx)
        unet_fwd = counter.get_total_flops() / 1e9
        encoder = 0.0
        if f > 1:
            fs = first_stage_config(preset, f)
            ae = AutoencoderKL(fs.ddconfig, fs.embed_dim)
            with FlopCounterMode(display=False) as counter:
                ae.encode(torch.zeros(1, 3, preset.image_size, preset.image_size))
            encoder = counter.get_total_flops() / 1e9
    return {"unet_fwd_gflop": unet_fwd, "encoder_gflop": encoder, "train_gflop": 3 * unet_fwd + encoder}


def first_stage_config(preset: Preset, f: int) -> AutoencoderKLConfig:
    """The KL autoencoder of factor ``f >= 2`` (f=1: the unused :func:`placeholder_config`)."""
    if f == 1:
        return placeholder_config(preset)
    c = LATENT_CHANNELS[f]
    dd = DDConfig(
        double_z=True,
        z_channels=c,
        resolution=preset.image_size,
        ch=preset.ae_ch,
        ch_mult=AE_CH_MULT[f],
        num_res_blocks=preset.ae_res_blocks,
        attn_resolutions=(),
    )
    return AutoencoderKLConfig(ddconfig=dd, embed_dim=c)


def placeholder_config(preset: Preset) -> AutoencoderKLConfig:
    """f=1: a factor-1, 3-channel first stage the trainer's config asks for; never run (the data set gives
    pixels as ``latent`` and samples are not decoded)."""
    dd = DDConfig(
        double_z=True, z_channels=3, resolution=preset.image_size, ch=32, ch_mult=(1,), num_res_blocks=0
    )
    return AutoencoderKLConfig(ddconfig=dd, embed_dim=3)


def ldm_config(preset: Preset, f: int, unet: UNetConfig) -> ModelConfig:
    from ldm_sdk.training.data.assets import SCENE_CLASSES

    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    diffusion = DiffusionConfig(
        timesteps=1000,
        beta_schedule="linear",
        linear_start=0.0015,
        linear_end=0.0195,
        parameterization="eps",
        loss_type="l2",
        conditioning_key="crossattn",
        first_stage_key="image",
        cond_stage_key="class_label",
        image_size=s,
        channels=c,
        cond_stage_trainable=True,
        use_ema=True,
        scale_factor=1.0,
        scale_by_std=f > 1,  # pixels stay in [-1, 1]; KL latents get 1 / std of the first batch
    )
    cond = CondStageConfig(
        target=CLASS_TARGET,
        params={"embed_dim": preset.context_dim, "n_classes": len(SCENE_CLASSES), "key": "class_label"},
    )
    return ModelConfig(
        family=f"scenes-ldm-f{f}",
        first_stage=first_stage_config(preset, f),
        unet=unet,
        diffusion=diffusion,
        cond_stage=cond,
    )
