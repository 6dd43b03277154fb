"""ModelBundle: a loaded latent diffusion model laid out exactly like CompVis ``LatentDiffusion``.

Submodule names are the original ones (``model.diffusion_model``, ``first_stage_model``), so
:meth:`ModelBundle.compvis_state_dict` is key-for-key what a CompVis checkpoint holds: the schedule buffers at
top level (``betas``, ``alphas_cumprod`` ...), ``scale_factor`` when the model was trained with
``scale_by_std``, the EMA copy as ``model_ema.<parameter name without dots>`` plus ``model_ema.decay`` and
``model_ema.num_updates``. A first-stage-only bundle (an autoencoder checkpoint) keeps the autoencoder's own
unprefixed names.

The conditioning encoder's weights (``cond_stage_model.*``) are carried as tensors; the encoder plugins turn
them into modules.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ldm_sdk.diffusion.conditioning import Conditioning, apply_model
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS, DiffusionSchedule
from ldm_sdk.models.configs import AutoencoderKLConfig, ModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
from ldm_sdk.models.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
EMA_META = ("model_ema.decay", "model_ema.num_updates")
# Entries a checkpoint may carry that inference never uses (training-time loss networks).
TRAINING_ONLY_PREFIXES = ("loss.", "first_stage_model.loss.")


def ema_name(parameter_name: str) -> str:
    """CompVis ``LitEma`` buffer name of a ``model`` parameter (``diffusion_model.x.0.weight``): no dots."""
    return EMA_PREFIX + parameter_name.replace(".", "")


class DiffusionWrapper(nn.Module):
    """CompVis ``DiffusionWrapper``: routes conditioning into ``diffusion_model`` by conditioning key."""

    def __init__(self, diffusion_model: UNetModel, conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.conditioning_key = conditioning_key

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return apply_model(self.diffusion_model, x, t, cond, self.conditioning_key)


class ModelBundle(nn.Module):
    """First stage, UNet (absent for an autoencoder-only file), schedule and conditioning weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        fs = config.first_stage
        self.first_stage_model: AutoencoderKL | VQModel = (
            AutoencoderKL.from_config(fs) if isinstance(fs, AutoencoderKLConfig) else VQModel.from_config(fs)
        )
        self.model: DiffusionWrapper | None = None
        self.schedule: DiffusionSchedule | None = None
        if config.unet is not None and config.diffusion is not None:
            unet = UNetModel.from_config(config.unet)
            self.model = DiffusionWrapper(unet, config.diffusion.conditioning_key)
            # schedule tables are numpy/float64 work: always on the CPU, even when the networks are built
            # under a torch.device("meta") context (the loader does that to skip weight init)
            with torch.device("cpu"):
                self.schedule = DiffusionSchedule.from_config(config.diffusion)
        self.scale_factor = config.diffusion.scale_factor if config.diffusion else 1.0
        self.cond_stage_weights: dict[str, Tensor] = {}
        self.ema_weights: dict[str, Tensor] = {}
        self.extra_entries: dict[str, Tensor] = {}
        # set by the loader: training-only entries the file held and that were not loaded (loss.* ...),
        # and the CheckpointFile it came from (path, format, metadata, sha256; its tensors dropped)
        self.skipped_entries: tuple[str, ...] = ()
        self.source: object | None = None

    # -- what it is --------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.config.family

    @property
    def unet(self) -> UNetModel:
        if self.model is None:
            raise ValueError(f"{self.family!r} is a first-stage-only model: it has no UNet")
        return self.model.diffusion_model

    @property
    def parameterization(self) -> str | None:
        return self.config.diffusion.parameterization if self.config.diffusion else None

    @property
    def conditioning_key(self) -> str | None:
        return self.config.diffusion.conditioning_key if self.config.diffusion else None

    @property
    def latent_channels(self) -> int:
        return self.config.first_stage.embed_dim

    @property
    def downsampling_factor(self) -> int:
        return self.config.first_stage.ddconfig.downsampling_factor

    @property
    def has_ema(self) -> bool:
        return bool(self.ema_weights)

    # -- first stage -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(
        self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image in [-1, 1] -> scaled latent. KL: the posterior mode, or a sample when ``sample``."""
        return self.first_stage_encoding(image, sample=sample, generator=generator) * self.scale_factor

    @torch.no_grad()
    def first_stage_encoding(
        self, image: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image in [-1, 1] -> the first stage's latent before ``scale_factor`` (KL: the posterior mode, or a
        sample when ``sample``; VQ: the encoder's output, not quantized), what the inpainting models
        concatenate (``cond_stage_model.encode``)."""
        fsm = self.first_stage_model
        if isinstance(fsm, AutoencoderKL):
            posterior = fsm.encode(image)
            return posterior.sample(generator=generator) if sample else posterior.mode()
        return fsm.encode(image)  # type: ignore[no-any-return]

    @torch.no_grad()
    def decode_first_stage(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in about [-1, 1] (a VQ first stage quantizes here, as in the paper)."""
        return self.first_stage_model.decode(z / self.scale_factor)

    # -- diffusion ---------------------------------------------------------------------------------
    def apply_model(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if self.model is None:
            raise ValueError(f"{self.family!r} is a first-stage-only model: it cannot denoise")
        return self.model(x, t, cond)

    def denoiser(
        self, cond: Conditioning, *, guidance_scale: float = 1.0, uncond: Conditioning | None = None
    ) -> ModelDenoiser:
        """The denoiser samplers run on: this model's output as eps and x0, with optional guidance."""
        if self.schedule is None or self.parameterization is None:
            raise ValueError(f"{self.family!r} is a first-stage-only model: it cannot denoise")
        model_fn = self.apply_model
        if guidance_scale != 1.0:
            if uncond is None:
                raise ValueError("guidance_scale != 1 needs the unconditional conditioning (uncond=...)")
            model_fn = ClassifierFreeGuidance(self.apply_model, guidance_scale, uncond)
        return ModelDenoiser(model_fn, self.schedule, self.parameterization, cond)  # type: ignore[arg-type]

    # -- CompVis layout ----------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, torch.Size]:
        """Every key a strict CompVis checkpoint of this configuration must hold, with its shape."""
        return {k: v.shape for k, v in self._core_state_dict().items()}

    def _core_state_dict(self) -> dict[str, Tensor]:
        if self.model is None:
            return dict(self.first_stage_model.state_dict())
        out: dict[str, Tensor] = {}
        assert self.schedule is not None and self.config.diffusion is not None
        for name in SCHEDULE_BUFFERS:
            out[name] = getattr(self.schedule, name)
        if self.config.diffusion.scale_by_std:
            out["scale_factor"] = torch.tensor(self.scale_factor)
        for k, v in self.model.diffusion_model.state_dict().items():
            out[UNET_PREFIX + k] = v
        for k, v in self.first_stage_model.state_dict().items():
            out[FIRST_STAGE_PREFIX + k] = v
        return out

    def compvis_state_dict(self) -> dict[str, Tensor]:
        """The whole model as a CompVis ``state_dict``, conditioning and EMA weights included."""
        out = self._core_state_dict()
        if self.model is not None:
            out.update({COND_STAGE_PREFIX + k: v for k, v in self.cond_stage_weights.items()})
            out.update(self.ema_weights)
        out.update(self.extra_entries)
        return out

    def ema_key_map(self) -> dict[str, str]:
        """``model_ema.*`` key -> the UNet state-dict key it shadows."""
        if self.model is None:
            return {}
        return {ema_name(n): n.removeprefix("diffusion_model.") for n, _ in self.model.named_parameters()}

    def snapshot_ema(self, decay: float = 0.9999, num_updates: int = 0) -> None:
        """Start an EMA copy equal to the current UNet weights (as ``LitEma`` does at construction)."""
        if self.model is None:
            raise ValueError("a first-stage-only model has no EMA")
        self.ema_weights = {ema_name(n): p.detach().clone() for n, p in self.model.named_parameters()}
        self.ema_weights["model_ema.decay"] = torch.tensor(decay, dtype=torch.float32)
        self.ema_weights["model_ema.num_updates"] = torch.tensor(num_updates, dtype=torch.int32)

    def use_ema_weights(self) -> None:
        """Copy the EMA weights into the UNet (``use_ema=True`` at load time)."""
        if not self.ema_weights:
            raise ValueError("this checkpoint has no EMA weights (no model_ema.* entries)")
        unet_state = self.unet.state_dict()
        for key, target in self.ema_key_map().items():
            unet_state[target].copy_(self.ema_weights[key])


def split_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
