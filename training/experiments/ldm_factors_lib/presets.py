"""Presets: the factors, per-factor constants and the experiment scales (smoke, h100)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

FACTORS: tuple[int, ...] = (1, 2, 4, 8, 16)
#: latent channels per factor: the LDM zoo's KL first stages (kl-f4: 3, kl-f8: 4, kl-f16: 16); f=2 takes 3
LATENT_CHANNELS: dict[int, int] = {1: 3, 2: 3, 4: 3, 8: 4, 16: 16}
#: the autoencoder's ch_mult per factor (one downsampling per extra level; widths x ae_ch)
AE_CH_MULT: dict[int, tuple[int, ...]] = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 2, 2, 4, 4)}
#: UNet channel_mult patterns by number of levels; the first is the reference, the others help matching
MULT_PATTERNS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((1,),),
    2: ((1, 2), (1, 3), (2, 3), (1, 1)),
    3: ((1, 2, 3), (1, 2, 2), (1, 2, 4), (1, 1, 2)),
    4: ((1, 2, 3, 4), (1, 2, 2, 4), (1, 2, 2, 2), (1, 1, 2, 2)),
}
#: preset fields a later call may change: more or fewer LDM steps (FID curves stay comparable at common
#: steps; a finished factor continues from its checkpoint), the time budget, the renderer's processes
MAY_CHANGE = frozenset({"ldm_steps", "time_budget_s", "render_workers"})


# -- presets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Every setting of one run; ``run`` flags override single fields (``--ldm-steps`` ...)."""

    name: str
    image_size: int
    train_images: int
    ref_images: int  # held-out scenes: the FID reference
    # first stage (f >= 2)
    ae_ch: int
    ae_res_blocks: int
    ae_steps: int
    ae_batch: int
    ae_lr: float
    # LDM
    unet_channels: int  # model_channels of the f=1 reference UNet: its parameter count is the target
    unet_res_blocks: int
    attn_max_size: int  # attention at UNet levels whose feature map is at most this many pixels wide
    context_dim: int  # class embedding width (one cross-attention token)
    ldm_steps: int
    ldm_batch: int
    ldm_lr: float
    ldm_warmup: int
    eval_every: int
    # evaluation
    fid_samples: int
    fid_layer: str  # "2048": FID as published; "64": cheap (smoke on CPU), not FID as published
    ddim_steps: int
    sample_batch: int
    # machinery
    precision: str  # fp32 or bf16 (autocast)
    time_budget_s: float
    render_workers: int
    fid_reference: str = "heldout"  # "heldout": unseen scenes of the training assets; "val": unseen assets
    sources: tuple[str, ...] = ("emoji", "clipart")
    ae_kl_weight: float = 1e-6
    ae_disc_start: int = -1  # -1: no GAN term within the run (disc_start past the last step)
    min_feature: int = 4  # the UNet downsamples while its smallest feature map stays >= this
    max_levels: int = 4
    param_tolerance: float = 0.10
    seed: int = 0
    factors: tuple[int, ...] = (16, 8, 4, 2, 1)  # order of a sequential run: cheap factors first


PRESETS: dict[str, Preset] = {
    # CPU, seconds: the test runs two factors end to end
    "smoke": Preset(
        name="smoke",
        image_size=32,
        train_images=32,
        ref_images=16,
        ae_ch=32,
        ae_res_blocks=1,
        ae_steps=3,
        ae_batch=4,
        ae_lr=1e-4,
        unet_channels=32,
        unet_res_blocks=1,
        attn_max_size=8,
        context_dim=32,
        ldm_steps=6,
        ldm_batch=4,
        ldm_lr=1e-4,
        ldm_warmup=0,
        eval_every=3,
        fid_samples=8,
        fid_layer="64",
        ddim_steps=4,
        sample_batch=8,
        precision="fp32",
        time_budget_s=600.0,
        render_workers=0,
    ),
    # one H100 (or two): 64 px scenes, ~33M-parameter UNets, 2000 steps x 256 per factor; see
    # docs/experiments.md for the call plan within 10-minute commands
    "h100": Preset(
        name="h100",
        image_size=64,
        train_images=20_000,
        ref_images=2_000,
        ae_ch=64,
        ae_res_blocks=1,
        ae_steps=1_500,
        ae_batch=64,
        ae_lr=2e-4,
        unet_channels=64,
        unet_res_blocks=2,
        attn_max_size=16,
        context_dim=256,
        ldm_steps=2_000,
        ldm_batch=256,
        ldm_lr=1e-4,
        ldm_warmup=100,
        eval_every=500,
        fid_samples=1_000,
        fid_layer="2048",
        ddim_steps=50,
        sample_batch=500,
        precision="bf16",
        time_budget_s=480.0,
        render_workers=14,
    ),
}


def preset_json(preset: Preset) -> dict[str, Any]:
    """The preset as results.json stores it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def resolve_preset(name: str, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **changes)
