"""Training checkpoints: one ``.ckpt`` that ``ldm_sdk.load`` reads as a model and the scripts resume from.

The file is a Lightning-style dict, written atomically (temporary file in the same folder, fsync, rename)::

    {
      "state_dict": {...},               # the model, CompVis layout: ModelBundle.compvis_state_dict()
                                         #   (+ "loss.*" for an autoencoder: discriminator, LPIPS, logvar)
      "global_step": int, "epoch": int,
      "ldm_sdk_config": "<ModelConfig JSON>",     # so ldm_sdk.load needs no YAML
      "ldm_sdk_metadata": {str: str},
      "ldm_sdk_training_state": {
          "optimizers": [state_dict, ...], "schedulers": [state_dict, ...], "scaler": ... ,
          "data": {"epoch": int, "batches_done": int, "seed": int, "world_size": int},
          "rng": [per-rank RNG state, ...],      # torch CPU, CUDA, numpy, python, named generators
          "train_config": "<TrainConfig JSON>", "extra": {...},
      },
    }

Everything in it loads with ``torch.load(weights_only=True)`` (numpy and Python RNG states are stored as
tensors and ints), so resuming never unpickles code. Resuming restores the model, EMA, optimizers,
schedulers, step, epoch, data position and every rank's RNG states: training continues exactly as if it
had not stopped (same world size and data; with a different world size it continues, not bit for bit).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm_sdk.checkpoints.loader import _atomic_write, _compact

TRAINING_STATE_KEY = "ldm_sdk_training_state"
CHECKPOINT_FORMAT = 1


# -- RNG states -------------------------------------------------------------------------------------------
def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states (torch CPU, every initialised CUDA device, numpy, Python, ``generators``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`; every generator named in ``generators`` must be in the state."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
    stored = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in stored:
            raise ValueError(
                f"the checkpoint has no state for the generator {name!r} (it has {sorted(stored)})"
            )
        g.set_state(stored[name])


# -- the file ---------------------------------------------------------------------------------------------
@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds, read back by :func:`load_training_checkpoint`."""

    state_dict: dict[str, Tensor]
    global_step: int
    epoch: int
    config_json: str | None
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)
    rng: list[dict[str, Any]] = field(default_factory=list)
    train_config_json: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_checkpoint(
    path: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, Tensor],
    config_json: str,
    global_step: int,
    epoch: int,
    optimizers: list[dict[str, Any]],
    schedulers: list[dict[str, Any]] | None = None,
    data: Mapping[str, int] | None = None,
    rng: list[dict[str, Any]] | None = None,
    train_config_json: str | None = None,
    extra: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a training checkpoint atomically (see the module docstring); returns its path.

    ``state_dict`` is the model in CompVis layout; ``optimizers`` / ``schedulers`` their ``state_dict()``;
    ``rng`` the :func:`capture_rng` of every rank (rank order).
    """
    from ldm_sdk import __version__

    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save {path}: folder {path.parent} does not exist")
    payload = {
        "state_dict": _compact(state_dict),
        "global_step": int(global_step),
        "epoch": int(epoch),
        "ldm_sdk_config": config_json,
        "ldm_sdk_metadata": {"ldm_sdk.version": __version__, **dict(metadata or {})},
        TRAINING_STATE_KEY: {
            "format": CHECKPOINT_FORMAT,
            "optimizers": [_to_cpu(o) for o in optimizers],
            "schedulers": list(schedulers or []),
            "data": dict(data or {}),
            "rng": [_to_cpu(r) for r in (rng or [])],
            "train_config": train_config_json,
            "extra": _to_cpu(dict(extra or {})),
        },
    }

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)

    _atomic_write(path, write)
    return path


def load_training_checkpoint(path: str | os.PathLike[str]) -> TrainingCheckpoint:
    """Read a file written by :func:`save_training_checkpoint` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a training checkpoint written by ldm-sdk: {exc}") from exc
    if not isinstance(raw, dict) or TRAINING_STATE_KEY not in raw or "state_dict" not in raw:
        raise ValueError(
            f"{path} has no {TRAINING_STATE_KEY!r}: it is a model checkpoint, not a training checkpoint. "
            "Start a new run from it (--init-from for the LDM, --resume only takes files these scripts wrote)"
        )
    state = raw[TRAINING_STATE_KEY]
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: training-state format {state.get('format')!r}; this ldm-sdk reads {CHECKPOINT_FORMAT}"
        )
    return TrainingCheckpoint(
        state_dict=dict(raw["state_dict"]),
        global_step=int(raw.get("global_step", 0)),
        epoch=int(raw.get("epoch", 0)),
        config_json=raw.get("ldm_sdk_config"),
        optimizers=list(state["optimizers"]),
        schedulers=list(state["schedulers"]),
        data=dict(state["data"]),
        rng=list(state["rng"]),
        train_config_json=state.get("train_config"),
        extra=dict(state.get("extra", {})),
    )


def resolve_resume(resume: str | os.PathLike[str] | None, out_dir: Path) -> Path | None:
    """``--resume``: None, ``auto`` (``out_dir/last.ckpt`` when it exists, else a fresh start) or a path."""
    if resume is None:
        return None
    if str(resume) == "auto":
        last = out_dir / "last.ckpt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such file (pass a training .ckpt, or 'auto')")
    return path


def publish_last(path: Path, out_dir: Path) -> Path:
    """Make ``out_dir/last.ckpt`` the file at ``path``, atomically (a hard link renamed into place; a copy
    where the file system has no hard links)."""
    import shutil

    last = out_dir / "last.ckpt"
    tmp = out_dir / f".last.ckpt.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)
    return last


def rotate_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``step-*.ckpt`` files in ``out_dir``."""
    steps = sorted(out_dir.glob("step-*.ckpt"), key=lambda p: p.name)
    for old in steps[: max(0, len(steps) - keep_last)]:
        old.unlink(missing_ok=True)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


__all__ = [
    "TRAINING_STATE_KEY",
    "TrainingCheckpoint",
    "capture_rng",
    "load_training_checkpoint",
    "publish_last",
    "resolve_resume",
    "restore_rng",
    "rotate_checkpoints",
    "save_training_checkpoint",
]
