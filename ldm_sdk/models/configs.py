"""Typed configurations of every network, named exactly like the CompVis YAML ``params`` they come from.

An original config (``model.params.unet_config.params`` ...) maps onto these field for field; values the
original accepted but that do not change the network (``use_fp16``, ``image_size`` for the UNet) are kept
so a config round-trips. Unknown fields are refused, with the list of valid ones, rather than ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UNetConfig(_Config):
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel`` parameters."""

    image_size: int = 32
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    n_embed: int | None = None
    legacy: bool = True
    use_linear_in_transformer: bool = False

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the conditioning width)")
        if self.dims != 2:
            raise ValueError(f"dims={self.dims}: only 2-D UNets are supported")
        return self


class DDConfig(_Config):
    """``ddconfig`` of the first-stage Encoder/Decoder (``ldm.modules.diffusionmodules.model``)."""

    double_z: bool = True
    z_channels: int
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    resamp_with_conv: bool = True
    attn_type: Literal["vanilla", "none"] = "vanilla"
    give_pre_end: bool = False
    tanh_out: bool = False
    use_linear_attn: bool = False

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class AutoencoderKLConfig(_Config):
    """``ldm.models.autoencoder.AutoencoderKL``: a KL-regularised first stage."""

    kind: Literal["kl"] = "kl"
    ddconfig: DDConfig
    embed_dim: int


class VQModelConfig(_Config):
    """``ldm.models.autoencoder.VQModel`` / ``VQModelInterface``: a vector-quantised first stage."""

    kind: Literal["vq"] = "vq"
    ddconfig: DDConfig
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    remap: str | None = None
    unknown_index: str | int = "random"
    sane_index_shape: bool = False
    legacy: bool = True


FirstStageConfig = AutoencoderKLConfig | VQModelConfig

BetaSchedule = Literal["linear", "cosine", "sqrt_linear", "sqrt"]
Parameterization = Literal["eps", "x0", "v"]
ConditioningKey = Literal["concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm"] | None


class DiffusionConfig(_Config):
    """The diffusion process of ``ldm.models.diffusion.ddpm.LatentDiffusion`` (its top-level params)."""

    timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    parameterization: Parameterization = "eps"
    loss_type: Literal["l1", "l2"] = "l2"
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    v_posterior: float = 0.0
    logvar_init: float = 0.0
    learn_logvar: bool = False
    clip_denoised: bool = True
    scale_factor: float = 1.0
    scale_by_std: bool = False
    conditioning_key: ConditioningKey = None
    first_stage_key: str = "image"
    cond_stage_key: str = "image"
    image_size: int = 64
    channels: int = 4
    cond_stage_trainable: bool = False
    use_ema: bool = True


class CondStageConfig(_Config):
    """The conditioning encoder as the original config names it; built by the encoder plugins."""

    target: str
    params: dict[str, object] = Field(default_factory=dict)


class ModelConfig(_Config):
    """A whole latent diffusion model: what ``ldm_sdk.load`` builds."""

    family: str = "custom"
    first_stage: AutoencoderKLConfig | VQModelConfig = Field(discriminator="kind")
    # None for a first-stage-only file (an autoencoder checkpoint of the model zoo or of our training)
    unet: UNetConfig | None = None
    diffusion: DiffusionConfig | None = None
    cond_stage: CondStageConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.unet is None) != (self.diffusion is None):
            raise ValueError("unet and diffusion come together: give both (a diffusion model) or neither")
        return self
