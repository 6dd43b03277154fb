"""diffusers ``config.json`` files <-> our typed configs (UNet, first stage, schedule).

Only the subset both sides express is mapped; anything else raises :class:`DiffusersFormatError` naming the
option, its value and what is supported (see :mod:`ldm_sdk.checkpoints.diffusers_format`). Options diffusers
adds later and that we do not know are ignored; the ones that would change the computation are checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ldm_sdk.checkpoints.families import first_stage_attention_levels, spatial_heads, unet_attention_levels
from ldm_sdk.diffusion.schedule import make_beta_schedule
from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, DiffusionConfig, UNetConfig, VQModelConfig

DIFFUSERS_VERSION = "0.42.1"  # the diffusers version these folders were checked against

_SCHEDULE_TO_DIFFUSERS = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
_SCHEDULE_FROM_DIFFUSERS = {v: k for k, v in _SCHEDULE_TO_DIFFUSERS.items()}
_PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_PREDICTION_FROM_DIFFUSERS = {v: k for k, v in _PREDICTION_TO_DIFFUSERS.items()}

# UNet2DConditionModel options that change the computation, with the values a CompVis UNet has.
_UNET_FIXED: dict[str, tuple[object, ...]] = {
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "act_fn": ("silu", "swish"),
    "norm_num_groups": (32,),
    "norm_eps": (1e-5,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "reverse_transformer_layers_per_block": (None,),
    "num_attention_heads": (None,),
}
_VAE_FIXED: dict[str, tuple[object, ...]] = {
    "act_fn": ("silu", "swish"),
    "norm_num_groups": (32,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
    "norm_type": ("group",),
}


class DiffusersFormatError(ValueError):
    """The model (or folder) uses something the CompVis <-> diffusers mapping does not cover."""


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, tuple[object, ...]], what: str) -> None:
    for key, allowed in fixed.items():
        value = cfg.get(key, allowed[0])
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise DiffusersFormatError(
                f"{what}: {key}={value!r} has no CompVis equivalent; supported: {list(allowed)}"
            )


def _per_level(value: object, levels: int, key: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, list | tuple) and len(value) == levels and all(isinstance(v, int) for v in value):
        return list(value)
    raise DiffusersFormatError(f"unet config: {key}={value!r} must be an int or one int per block ({levels})")


# -- UNet -----------------------------------------------------------------------------------------------
def unet_to_diffusers(u: UNetConfig, *, sample_size: int) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config.json of ``u``."""
    problems = []
    if not u.use_spatial_transformer:
        problems.append(
            "use_spatial_transformer=False (plain AttentionBlock attention; diffusers holds such UNets as "
            "UNet2DModel, which is not supported here)"
        )
    if u.resblock_updown:
        problems.append("resblock_updown=True (ResBlock resampling inside attention levels)")
    if not u.conv_resample:
        problems.append("conv_resample=False")
    if u.n_embed is not None:
        problems.append("n_embed (codebook-id prediction)")
    levels = len(u.channel_mult)
    attention = unet_attention_levels(u.attention_resolutions, levels)
    widths = [u.model_channels * m for m in u.channel_mult]
    heads = [spatial_heads(u, w) for w in widths]
    for level in {*attention, levels - 1}:  # the middle block works at the deepest width
        h, d = heads[level]
        if h * d != widths[level]:
            problems.append(f"level {level}: {h} heads x {d} channels != width {widths[level]}")
    if problems:
        raise DiffusersFormatError(
            "this UNet cannot be written as a UNet2DConditionModel: " + "; ".join(problems)
        )
    head_counts = [h for h, _ in heads]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": [
            "CrossAttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)
        ],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))
        ],
        "only_cross_attention": False,
        "block_out_channels": widths,
        "layers_per_block": u.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": u.dropout,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": u.context_dim,
        "transformer_layers_per_block": u.transformer_depth,
        # diffusers' "attention_head_dim" of UNet2DConditionModel is the number of heads (a known misnomer)
        "attention_head_dim": head_counts[0] if len(set(head_counts)) == 1 else head_counts,
        "use_linear_projection": u.use_linear_in_transformer,
        "class_embed_type": None,
        "num_class_embeds": u.num_classes,
        "upcast_attention": False,
        "resnet_time_scale_shift": "scale_shift" if u.use_scale_shift_norm else "default",
    }


def unet_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """The CompVis ``UNetConfig`` of a ``UNet2DConditionModel`` config.json."""
    what = "unet config"
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise DiffusersFormatError(
            f"{what}: _class_name={cfg['_class_name']!r}; supported: UNet2DConditionModel"
        )
    _check_fixed(cfg, _UNET_FIXED, what)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    levels = len(down)
    valid_down, valid_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down) - valid_down or set(up) - valid_up or len(up) != levels:
        raise DiffusersFormatError(
            f"{what}: block types {down} / {up} are not supported; "
            f"valid: {sorted(valid_down)} / {sorted(valid_up)}"
        )
    attention = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    if tuple(i for i, t in enumerate(reversed(up)) if t == "CrossAttnUpBlock2D") != attention:
        raise DiffusersFormatError(
            f"{what}: up blocks {up} do not mirror down blocks {down} (CompVis UNets do)"
        )
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise DiffusersFormatError(
            f"{what}: mid_block_type={cfg['mid_block_type']!r}; supported: UNetMidBlock2DCrossAttn"
        )
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise DiffusersFormatError(
            f"{what}: resnet_time_scale_shift={shift!r}; supported: default, scale_shift"
        )
    widths = list(cfg["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise DiffusersFormatError(
            f"{what}: block_out_channels {widths} are not multiples of the first ({mc})"
        )
    layers = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    heads = _per_level(cfg.get("attention_head_dim", 8), levels, "attention_head_dim")
    if len(set(layers)) != 1 or len(set(depth)) != 1:
        raise DiffusersFormatError(
            f"{what}: per-block layers_per_block / transformer_layers_per_block are not supported"
        )
    context = cfg.get("cross_attention_dim", 1280)
    if not isinstance(context, int):
        raise DiffusersFormatError(f"{what}: cross_attention_dim={context!r} must be one int")
    used = sorted({*attention, levels - 1})
    if any(widths[i] % heads[i] for i in used):
        raise DiffusersFormatError(f"{what}: widths {widths} are not divisible by head counts {heads}")
    if len({heads[i] for i in used}) == 1:
        num_heads, head_channels = heads[used[0]], -1
    elif len({widths[i] // heads[i] for i in used}) == 1:
        num_heads, head_channels = -1, widths[used[0]] // heads[used[0]]
    else:
        raise DiffusersFormatError(
            f"{what}: head counts {heads} over widths {widths} are neither one count nor one width per head"
        )
    return UNetConfig(
        image_size=int(cfg.get("sample_size") or 32),
        in_channels=cfg.get("in_channels", 4),
        model_channels=mc,
        out_channels=cfg.get("out_channels", 4),
        num_res_blocks=layers[0],
        attention_resolutions=tuple(2**i for i in attention),
        dropout=float(cfg.get("dropout", 0.0)),
        channel_mult=tuple(w // mc for w in widths),
        num_classes=cfg.get("num_class_embeds"),
        num_heads=num_heads,
        num_head_channels=head_channels,
        use_scale_shift_norm=shift == "scale_shift",
        use_spatial_transformer=True,
        transformer_depth=depth[0],
        context_dim=context,
        legacy=False,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
    )


# -- first stage ----------------------------------------------------------------------------------------
def first_stage_to_vae(fs: AutoencoderKLConfig | VQModelConfig, *, scale_factor: float) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` / ``VQModel`` config.json of ``fs``."""
    dd = fs.ddconfig
    problems = []
    if dd.ch_mult[0] != 1:
        problems.append(
            f"ch_mult={dd.ch_mult} does not start at 1 (diffusers' conv_in width is the first block's)"
        )
    if isinstance(fs, AutoencoderKLConfig) and dd.z_channels != fs.embed_dim:
        problems.append(f"z_channels={dd.z_channels} != embed_dim={fs.embed_dim}")
    if isinstance(fs, VQModelConfig) and fs.remap is not None:
        problems.append("remap (a reduced codebook index table)")
    for flag in ("give_pre_end", "tanh_out", "use_linear_attn"):
        if getattr(dd, flag):
            problems.append(f"{flag}=True")
    if not dd.resamp_with_conv:
        problems.append("resamp_with_conv=False")
    if problems:
        raise DiffusersFormatError("this autoencoder cannot be written for diffusers: " + "; ".join(problems))
    levels = len(dd.ch_mult)
    attn = dd.attn_type != "none"
    attention = first_stage_attention_levels(dd.attn_resolutions, levels, dd.resolution) if attn else ()
    out: dict[str, Any] = {
        "_class_name": "AutoencoderKL" if isinstance(fs, AutoencoderKLConfig) else "VQModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": dd.in_channels,
        "out_channels": dd.out_ch,
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in attention else "DownEncoderBlock2D" for i in range(levels)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if i in attention else "UpDecoderBlock2D" for i in reversed(range(levels))
        ],
        "block_out_channels": [dd.ch * m for m in dd.ch_mult],
        "layers_per_block": dd.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": dd.z_channels,
        "norm_num_groups": 32,
        "sample_size": dd.resolution,
        "scaling_factor": scale_factor,
        "mid_block_add_attention": attn,
    }
    if isinstance(fs, VQModelConfig):
        out.update(num_vq_embeddings=fs.n_embed, vq_embed_dim=fs.embed_dim, norm_type="group")
    else:
        out.update(use_quant_conv=True, use_post_quant_conv=True)
    return out


def first_stage_from_vae(cfg: Mapping[str, Any]) -> tuple[AutoencoderKLConfig | VQModelConfig, float]:
    """The first-stage config and latent scale factor of a diffusers VAE config.json."""
    what = "vae config"
    kind = cfg.get("_class_name", "AutoencoderKL")
    if kind not in ("AutoencoderKL", "VQModel"):
        raise DiffusersFormatError(f"{what}: _class_name={kind!r}; supported: AutoencoderKL, VQModel")
    _check_fixed(cfg, _VAE_FIXED, what)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    levels = len(down)
    valid_down, valid_up = (
        {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"},
        {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"},
    )
    if set(down) - valid_down or set(up) - valid_up or len(up) != levels:
        raise DiffusersFormatError(f"{what}: block types {down} / {up} are not supported")
    attention = tuple(i for i, t in enumerate(down) if t.startswith("Attn"))
    if tuple(i for i, t in enumerate(reversed(up)) if t.startswith("Attn")) != attention:
        raise DiffusersFormatError(f"{what}: decoder attention levels do not mirror the encoder's")
    mid_attention = bool(cfg.get("mid_block_add_attention", True))
    if attention and not mid_attention:
        raise DiffusersFormatError(f"{what}: level attention without mid-block attention has no CompVis form")
    widths = list(cfg["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise DiffusersFormatError(
            f"{what}: block_out_channels {widths} are not multiples of the first ({ch})"
        )
    sample = cfg.get("sample_size", 256)
    resolution = int(sample if isinstance(sample, int) else sample[0])
    z = int(cfg.get("latent_channels", 4 if kind == "AutoencoderKL" else 3))
    dd = DDConfig(
        double_z=kind == "AutoencoderKL",
        z_channels=z,
        resolution=resolution,
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 1),
        attn_resolutions=tuple(resolution // 2**i for i in attention),
        attn_type="vanilla" if mid_attention else "none",
    )
    scale = float(cfg.get("scaling_factor", 0.18215))
    if kind == "AutoencoderKL":
        return AutoencoderKLConfig(ddconfig=dd, embed_dim=z), scale
    return VQModelConfig(
        ddconfig=dd, n_embed=cfg.get("num_vq_embeddings", 256), embed_dim=cfg.get("vq_embed_dim") or z
    ), scale


# -- schedule -------------------------------------------------------------------------------------------
def scheduler_config(d: DiffusionConfig) -> dict[str, Any]:
    """A ``DDIMScheduler`` config with the same training schedule and parameterization as ``d``."""
    if d.beta_schedule == "cosine" and d.cosine_s != 8e-3:
        raise DiffusersFormatError(f"cosine_s={d.cosine_s}: diffusers' squaredcos_cap_v2 fixes s=0.008")
    out: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": d.timesteps,
        "beta_start": d.linear_start,
        "beta_end": d.linear_end,
        "beta_schedule": _SCHEDULE_TO_DIFFUSERS.get(d.beta_schedule, "linear"),
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": _PREDICTION_TO_DIFFUSERS[d.parameterization],
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    if d.beta_schedule == "sqrt":  # no diffusers name: give the betas themselves
        out["trained_betas"] = make_beta_schedule("sqrt", d.timesteps, d.linear_start, d.linear_end).tolist()
    return out


def diffusion_from_scheduler(
    sched: Mapping[str, Any], *, unet: UNetConfig, latent_channels: int, scale_factor: float
) -> DiffusionConfig:
    """The CompVis diffusion params a diffusers scheduler config (any scheduler class) stands for."""
    what = "scheduler config"
    if not sched:
        raise DiffusersFormatError(
            "scheduler/scheduler_config.json is missing: the training schedule is unknown"
        )
    if sched.get("rescale_betas_zero_snr"):
        raise DiffusersFormatError(f"{what}: rescale_betas_zero_snr=True has no CompVis schedule")
    steps = int(sched.get("num_train_timesteps", 1000))
    start, end = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 2e-2))
    trained = sched.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        start, end = float(betas[0] ** 2), float(betas[-1] ** 2)
        if len(betas) != steps or not np.allclose(
            betas, make_beta_schedule("sqrt", steps, start, end), rtol=1e-6
        ):
            raise DiffusersFormatError(
                f"{what}: trained_betas that are not a CompVis schedule are not supported"
            )
        schedule = "sqrt"
    else:
        name = sched.get("beta_schedule", "linear")
        if name not in _SCHEDULE_FROM_DIFFUSERS:
            raise DiffusersFormatError(
                f"{what}: beta_schedule={name!r}; "
                f"supported: {sorted(_SCHEDULE_FROM_DIFFUSERS)} (or trained_betas)"
            )
        schedule = _SCHEDULE_FROM_DIFFUSERS[name]
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION_FROM_DIFFUSERS:
        raise DiffusersFormatError(
            f"{what}: prediction_type={prediction!r}; supported: {sorted(_PREDICTION_FROM_DIFFUSERS)}"
        )
    if unet.in_channels < latent_channels:
        raise DiffusersFormatError(
            f"the UNet takes {unet.in_channels} channels, fewer than the {latent_channels} latent ones"
        )
    return DiffusionConfig(
        timesteps=steps,
        beta_schedule=schedule,  # type: ignore[arg-type]
        linear_start=start,
        linear_end=end,
        parameterization=_PREDICTION_FROM_DIFFUSERS[prediction],  # type: ignore[arg-type]
        scale_factor=scale_factor,
        conditioning_key="crossattn" if unet.in_channels == latent_channels else "hybrid",
        image_size=unet.image_size,
        channels=latent_channels,
        use_ema=False,
    )
