"""``ldm_sdk.load`` / ``ldm_sdk.checkpoints.loader.save``: checkpoint files <-> :class:`ModelBundle`.

Loading reads the file without running its code (:mod:`.safe_load`), resolves the configuration (given,
embedded by :func:`save`, or detected from keys and shapes), builds the networks on the meta device (no
wasted weight init), checks every key and shape strictly (:mod:`.keys`), and assigns the file's tensors.
The rest of the file is distributed the way CompVis ``LatentDiffusion`` holds it:

- ``cond_stage_model.*`` -> ``bundle.cond_stage_weights`` (prefix stripped; the encoder plugins build it);
- ``model_ema.*`` -> ``bundle.ema_weights`` (all of the UNet's EMA entries, or a grouped error);
- ``loss.*`` / ``first_stage_model.loss.*`` (training-time discriminators, LPIPS) are skipped, and listed in
  ``bundle.skipped_entries``;
- ``scale_factor`` overrides the config's value; ``logvar`` is kept in ``bundle.extra_entries``.

Schedule tables stay float32 whatever ``dtype`` is asked for; the file's tables are used (as CompVis
does) and the schedule is rebuilt from the file's betas when they differ from the config's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import (
    COND_STAGE_PREFIX,
    EMA_META,
    EMA_PREFIX,
    FIRST_STAGE_PREFIX,
    TRAINING_ONLY_PREFIXES,
    UNET_PREFIX,
    ModelBundle,
    split_prefix,
)
from ldm_sdk.checkpoints.keys import check_state_dict
from ldm_sdk.checkpoints.safe_load import CheckpointFile, CheckpointReadError, read_checkpoint
from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS, DiffusionSchedule
from ldm_sdk.models.configs import AutoencoderKLConfig, ModelConfig

ConfigLike = ModelConfig | str | os.PathLike[str] | Mapping[str, Any] | None
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIG_METADATA_KEY = "ldm_sdk.config"


def load(
    path: str | os.PathLike[str],
    config: ConfigLike = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
) -> ModelBundle:
    """Load a CompVis / Stable Diffusion checkpoint (``.safetensors`` or ``.ckpt``) into a ModelBundle.

    ``config``: None (the config :func:`save` embedded, else detected from the keys), an original YAML path
    or mapping, or a :class:`ModelConfig`. ``device`` defaults to the CPU; ``dtype`` (floating) converts the
    networks and conditioning weights, else they keep the file's dtype. ``use_ema`` puts the EMA weights in
    the UNet. Raises ``CheckpointReadError``, ``UnsafeCheckpointError``, ``CheckpointMismatchError`` or
    ``UnknownCheckpointError`` (all ``ValueError``) with what was wrong and what is valid.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    ckpt = read_checkpoint(path)
    model_config, _ = resolve_config(config, ckpt)
    return bundle_from_checkpoint(ckpt, model_config, device=device, dtype=dtype, use_ema=use_ema)


def resolve_config(config: ConfigLike, ckpt: CheckpointFile) -> tuple[ModelConfig, str]:
    """The ModelConfig to build and where it came from: argument, yaml, embedded or detected."""
    if isinstance(config, ModelConfig):
        return config, "argument"
    if isinstance(config, Mapping) and "first_stage" in config:  # a ModelConfig as a plain mapping
        return ModelConfig.model_validate(dict(config)), "argument"
    if isinstance(config, str | os.PathLike | Mapping):
        from ldm_sdk.checkpoints.original_config import config_from_yaml

        return config_from_yaml(config), "yaml"
    if config is not None:
        raise TypeError(
            f"config must be None, a YAML path, a mapping or a ModelConfig; got {type(config).__name__}"
        )
    embedded = ckpt.embedded_config
    if embedded is not None:
        try:
            return ModelConfig.model_validate_json(embedded), "embedded"
        except ValueError as e:
            raise CheckpointReadError(
                f"{ckpt.path}: the ldm-sdk config stored in the file is invalid: {e}"
            ) from None
    from ldm_sdk.checkpoints.detect import detect_config

    return detect_config(ckpt.tensors, name_hint=ckpt.path), "detected"


# -- building ---------------------------------------------------------------------------------------------
def empty_bundle(config: ModelConfig) -> ModelBundle:
    """A bundle whose networks live on the meta device (no memory, no init); the schedule is real."""
    with torch.device("meta"):
        return ModelBundle(config)


class Partition:
    """A checkpoint's tensors sorted into where they go in a ModelBundle."""

    def __init__(self, bundle: ModelBundle, tensors: Mapping[str, Tensor]) -> None:
        self.core: dict[str, Tensor] = {}
        self.cond: dict[str, Tensor] = {}
        self.ema: dict[str, Tensor] = {}
        self.extra: dict[str, Tensor] = {}
        self.training: list[str] = []
        self.scale_factor: Tensor | None = None
        diffusion = bundle.model is not None
        expects_scale = "scale_factor" in bundle.expected_shapes()
        for key, value in tensors.items():
            if key.startswith(TRAINING_ONLY_PREFIXES):
                self.training.append(key)
            elif diffusion and key.startswith(COND_STAGE_PREFIX):
                self.cond[key[len(COND_STAGE_PREFIX) :]] = value
            elif diffusion and key.startswith(EMA_PREFIX):
                self.ema[key] = value
            elif diffusion and key == "logvar":
                self.extra[key] = value
            elif key == "scale_factor" and not expects_scale:
                self.scale_factor = value
            else:
                self.core[key] = value
        if "scale_factor" in self.core:
            self.scale_factor = self.core["scale_factor"]


def check_partition(bundle: ModelBundle, part: Partition, *, what: str) -> None:
    """Strict check of the core weights and (when present) the EMA weights against the bundle's layout."""
    against = f"the configuration {bundle.config.family!r}"
    check_state_dict(bundle.expected_shapes(), part.core, what=what, against=against)
    if part.ema:
        unet_shapes = {k: v.shape for k, v in bundle.unet.state_dict().items()}
        expected = {k: unet_shapes[target] for k, target in bundle.ema_key_map().items()}
        given = {k: v for k, v in part.ema.items() if k not in EMA_META}
        check_state_dict(expected, given, what=f"{what}'s EMA weights (model_ema.*)", against=against)


def bundle_from_checkpoint(
    ckpt: CheckpointFile,
    config: ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
) -> ModelBundle:
    """Build ``config``'s bundle and fill it with ``ckpt``'s weights (see the module docstring)."""
    if use_ema and config.unet is None:
        raise ValueError(f"use_ema=True, but {config.family!r} is a first-stage-only model: it has no EMA")
    bundle = empty_bundle(config)
    part = Partition(bundle, ckpt.tensors)
    check_partition(bundle, part, what=str(ckpt.path))
    if use_ema and not part.ema:
        raise ValueError(
            f"use_ema=True, but {ckpt.path} has no EMA weights (no model_ema.* entries); load it without "
            "use_ema (its weights are the live ones)"
        )
    _assign(bundle, part)
    bundle.cond_stage_weights = part.cond
    bundle.ema_weights = part.ema
    bundle.extra_entries = part.extra
    bundle.skipped_entries = tuple(part.training)
    bundle.source = dataclasses.replace(ckpt, tensors={})
    if part.scale_factor is not None:
        bundle.scale_factor = float(part.scale_factor.float().item())
    if use_ema:
        bundle.use_ema_weights()
    _move(bundle, device, dtype)
    _align(bundle)
    return bundle.eval()


def _assign(bundle: ModelBundle, part: Partition) -> None:
    networks: list[tuple[torch.nn.Module, dict[str, Tensor], Callable[[], torch.nn.Module]]] = []
    if bundle.model is None:
        networks.append((bundle.first_stage_model, part.core, lambda: _real_first_stage(bundle.config)))
    else:
        unet_config = bundle.config.unet
        assert unet_config is not None

        def real_unet() -> torch.nn.Module:
            from ldm_sdk.models.unet import UNetModel

            return UNetModel.from_config(unet_config)

        networks.append((bundle.model.diffusion_model, split_prefix(part.core, UNET_PREFIX), real_unet))
        first = split_prefix(part.core, FIRST_STAGE_PREFIX)
        networks.append((bundle.first_stage_model, first, lambda: _real_first_stage(bundle.config)))
        _assign_schedule(bundle, {k: part.core[k] for k in SCHEDULE_BUFFERS})
    for module, state, _build in networks:
        module.load_state_dict(state, strict=True, assign=True)
    # Buffers a network computes itself (not in its state dict) are still on meta: build that network for
    # real and take the file's weights into it (costs its init, only for such networks).
    if bundle.model is not None and _has_meta(bundle.model.diffusion_model):
        unet = networks[0][2]()
        unet.load_state_dict(networks[0][1], strict=True, assign=True)
        bundle.model.diffusion_model = unet  # type: ignore[assignment]
    if _has_meta(bundle.first_stage_model):
        first_stage = networks[-1][2]()
        first_stage.load_state_dict(networks[-1][1], strict=True, assign=True)
        bundle.first_stage_model = first_stage  # type: ignore[assignment]


def _real_first_stage(config: ModelConfig) -> torch.nn.Module:
    from ldm_sdk.models.first_stage import AutoencoderKL, VQModel

    fs = config.first_stage
    return AutoencoderKL.from_config(fs) if isinstance(fs, AutoencoderKLConfig) else VQModel.from_config(fs)


def _has_meta(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _assign_schedule(bundle: ModelBundle, tables: dict[str, Tensor]) -> None:
    schedule = bundle.schedule
    assert schedule is not None and bundle.config.diffusion is not None
    file_betas = tables["betas"].double()
    if not torch.allclose(file_betas, schedule.betas.double(), rtol=1e-3, atol=1e-7):
        warnings.warn(
            f"the checkpoint's diffusion schedule differs from the config's ({bundle.config.family!r}); "
            "using the checkpoint's, as the original code does",
            stacklevel=3,
        )
        schedule = DiffusionSchedule(file_betas.numpy(), v_posterior=bundle.config.diffusion.v_posterior)
        bundle.schedule = schedule
    if all(t.dtype == torch.float32 for t in tables.values()):  # exactly the file's tables
        schedule.load_state_dict(tables, strict=True)


def _move(bundle: ModelBundle, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
    if dtype is not None:
        bundle.first_stage_model.to(dtype)
        if bundle.model is not None:
            bundle.model.to(dtype)
        bundle.cond_stage_weights = {k: _to(v, None, dtype) for k, v in bundle.cond_stage_weights.items()}
        bundle.ema_weights = {
            k: v if k in EMA_META else _to(v, None, dtype) for k, v in bundle.ema_weights.items()
        }
    if device is not None:
        target = torch.device(device)
        bundle.to(target)
        bundle.cond_stage_weights = {k: _to(v, target, None) for k, v in bundle.cond_stage_weights.items()}
        bundle.ema_weights = {k: _to(v, target, None) for k, v in bundle.ema_weights.items()}
        bundle.extra_entries = {k: _to(v, target, None) for k, v in bundle.extra_entries.items()}


def _align(module: torch.nn.Module, alignment: int = 64) -> None:
    """Copy CPU weights that sit unaligned in a mapped file (safetensors) into aligned memory: CPU kernels
    take other code paths on unaligned data, and the same weights would compute slightly different
    results depending on the file they came from."""
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is not None and t.device.type == "cpu" and t.numel() and t.data_ptr() % alignment:
                    if isinstance(t, torch.nn.Parameter):
                        t.data = t.data.clone()
                    else:
                        table[name] = t.clone()


def _to(t: Tensor, device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)


# -- saving -----------------------------------------------------------------------------------------------
def save(
    bundle: ModelBundle, path: str | os.PathLike[str], *, metadata: Mapping[str, object] | None = None
) -> Path:
    """Write ``bundle`` as flat CompVis keys.

    ``.safetensors``: string metadata, the config JSON under ``ldm_sdk.config``. ``.ckpt``/``.pt``/``.pth``/
    ``.bin``: Lightning-style ``{"state_dict", "global_step", "ldm_sdk_config", "ldm_sdk_metadata"}``.
    Written to a temporary file in the same folder, then renamed into place (atomic).
    """
    from ldm_sdk import __version__

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"cannot save as {path.name!r}: valid suffixes are .safetensors, {', '.join(TORCH_SUFFIXES)}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: folder {path.parent} does not exist")
    tensors = _compact(bundle.compvis_state_dict())
    config_json = bundle.config.model_dump_json()
    strings = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    strings.update(
        {CONFIG_METADATA_KEY: config_json, "ldm_sdk.version": __version__, "ldm_sdk.family": bundle.family}
    )
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp), metadata={"format": "pt", **strings})

    else:
        step = (metadata or {}).get("global_step", 0)
        payload = {
            "state_dict": tensors,
            "global_step": int(step) if isinstance(step, int | str | float) else 0,
            "ldm_sdk_config": config_json,
            "ldm_sdk_metadata": strings,
        }

        def write(tmp: Path) -> None:
            torch.save(payload, tmp)

    _atomic_write(path, write)
    return path


def _compact(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors, each owning exactly its own storage (views of a larger or shared storage are copied)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        exact = (
            t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        )
        ptr = storage.data_ptr()
        if not exact or (ptr and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        out[key] = t
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb"):  # created here (respecting the umask), filled by write()
            pass
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
