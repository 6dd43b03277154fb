"""The built-in plugin: ldm-sdk's own samplers, schedules, checkpoint formats, model families and condition
encoders.

Registered by every :class:`~ldm_sdk.runtime.Runtime` under the name ``"builtin"`` through the same hooks
third-party plugins implement (disable it like any plugin: ``LDM_SDK_DISABLE_PLUGINS=builtin``). Each hook
imports its modules when called, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm_sdk.hookspecs import CheckpointFormat, Sampler, ScheduleFn, hookimpl

if TYPE_CHECKING:
    import torch

    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.registry import Registry

_SCHEDULES = {
    "linear": "CompVis 'linear': linear in sqrt(beta) from linear_start to linear_end (SD, LDM default)",
    "cosine": "Nichol & Dhariwal 2021 cosine schedule, offset cosine_s, betas clipped at 0.999",
    "sqrt_linear": "betas linear from linear_start to linear_end",
    "sqrt": "square root of betas linear from linear_start to linear_end",
}


@hookimpl
def ldm_register_samplers(registry: Registry[Sampler]) -> None:
    from ldm_sdk.samplers import SAMPLERS

    for name, sample in SAMPLERS.items():
        registry.add(name, sample)


@hookimpl
def ldm_register_schedules(registry: Registry[ScheduleFn]) -> None:
    from ldm_sdk.diffusion.schedule import make_beta_schedule

    for name, text in _SCHEDULES.items():
        registry.add(name, functools.partial(make_beta_schedule, name), description=text)


@hookimpl
def ldm_register_checkpoint_formats(registry: Registry[CheckpointFormat]) -> None:
    registry.add(
        "safetensors",
        CheckpointFormat(
            suffixes=(".safetensors",),
            detect=functools.partial(_sniffed_as, ("safetensors",)),
            load=_load_file,
            description="safetensors file (the default): tensors and string metadata, no code",
        ),
    )
    registry.add(
        "ckpt",
        CheckpointFormat(
            suffixes=(".ckpt", ".pt", ".pth", ".bin"),
            detect=functools.partial(_sniffed_as, ("torch-zip", "torch-legacy")),
            load=_load_file,
            description="torch.save file, read with weights_only / a restricted unpickler; code is refused",
        ),
    )
    registry.add(
        "diffusers",
        CheckpointFormat(
            suffixes=(),
            detect=_is_diffusers_folder,
            load=_load_diffusers_folder,
            description="diffusers folder (model_index.json, unet/, vae/, scheduler/), CompVis names",
        ),
    )


@hookimpl
def ldm_register_model_families(registry: Registry[Any]) -> None:
    from ldm_sdk.checkpoints.families import FAMILIES

    for name, family in FAMILIES.items():
        registry.add(name, family)


@hookimpl
def ldm_register_tasks(registry: Registry[Any]) -> None:
    from ldm_sdk.tasks import register_builtin_tasks

    register_builtin_tasks(registry)


@hookimpl
def ldm_register_condition_encoders(registry: Registry[Any]) -> None:
    """The standard encoders of the LDM paper and Stable Diffusion, as ``EncoderSpec`` s under stable names.

    ``mask`` is one encoder for both inpainting layouts (LDM 7-channel ``variant="ldm"``, SD 9-channel
    ``variant="sd"``): the same inputs, one class, the variant chosen from the model's conditioning key.
    """
    from ldm_sdk.encoders.base import EncoderSpec
    from ldm_sdk.encoders.class_embedder import ClassEmbedder
    from ldm_sdk.encoders.layout import LayoutEncoder
    from ldm_sdk.encoders.lowres import LowResImage
    from ldm_sdk.encoders.mask import MaskConditioner
    from ldm_sdk.encoders.semantic import SpatialRescaler
    from ldm_sdk.encoders.text_clip import FrozenCLIPEmbedder
    from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder
    from ldm_sdk.encoders.text_minilm import FrozenMiniLMEmbedder

    encoders: dict[str, tuple[type[Any], str]] = {
        "class": (ClassEmbedder, "class labels -> one learned cross-attention token (LDM cin256)"),
        "ldm-bert": (BERTEmbedder, "LDM text-to-image BERT-style transformer, trained with the UNet"),
        "clip-text": (FrozenCLIPEmbedder, "frozen CLIP ViT-L/14 text transformer (Stable Diffusion 1.x)"),
        "minilm": (FrozenMiniLMEmbedder, "frozen all-MiniLM-L6-v2 (offline): the default text encoder"),
        "semantic": (SpatialRescaler, "semantic map -> rescaled, channel-mapped concat map (LDM semantic)"),
        "lowres": (LowResImage, "low-res image concatenated to the latent (LDM super-resolution)"),
        "mask": (MaskConditioner, "inpainting mask + masked image -> concat map (LDM 7-ch, SD 9-ch)"),
        "layout": (LayoutEncoder, "boxes + object classes -> tokens -> transformer (LDM layout-to-image)"),
    }
    for name, (cls, text) in encoders.items():
        registry.add(name, EncoderSpec.of(cls, text))


# -- checkpoint format helpers (import ldm_sdk.checkpoints only when called) ----------------------------


def _sniffed_as(formats: tuple[str, ...], path: Path) -> bool:
    from ldm_sdk.checkpoints.safe_load import CheckpointReadError, sniff_format

    path = Path(path)
    if not path.is_file():
        return False
    try:
        return sniff_format(path) in formats
    except CheckpointReadError:
        return False


def _load_file(
    path: Path,
    config: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
) -> ModelBundle:
    from ldm_sdk.checkpoints.loader import load

    return load(path, config, device=device, dtype=dtype, use_ema=use_ema)


def _is_diffusers_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (
        (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()
    )


def _load_diffusers_folder(
    path: Path,
    config: Any = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
) -> ModelBundle:
    from ldm_sdk.checkpoints.diffusers_format import from_diffusers
    from ldm_sdk.checkpoints.loader import _move

    if config is not None:
        raise ValueError(
            f"{path} is a diffusers folder: it carries its own configuration, so config= must be None"
        )
    if use_ema:
        raise ValueError(f"{path} is a diffusers folder: it holds no EMA weights (load with use_ema=False)")
    bundle = from_diffusers(path)
    _move(bundle, device, dtype)
    return bundle
