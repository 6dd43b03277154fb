"""Checkpoints as the wild makes them: Lightning files naming classes of packages we don't install, and
pickles that try to run code. Built in-process from throwaway modules registered in ``sys.modules``."""

from __future__ import annotations

import argparse
import enum
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


@contextmanager
def fake_modules(*names: str) -> Iterator[dict[str, types.ModuleType]]:
    """Register empty modules (and their parent packages) for the duration of the block."""
    created: list[str] = []
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            dotted = ".".join(parts[:i])
            if dotted not in sys.modules:
                sys.modules[dotted] = types.ModuleType(dotted)
                created.append(dotted)
    try:
        yield {n: sys.modules[n] for n in names}
    finally:
        for dotted in created:
            sys.modules.pop(dotted, None)


def _define(module: types.ModuleType, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> type:
    cls = type(name, bases, {"__module__": module.__name__, **attrs})
    cls.__qualname__ = name
    setattr(module, name, cls)
    return cls


def _marking_setstate(marker: Path) -> Callable[[Any, Any], None]:
    def __setstate__(self: Any, state: Any) -> None:  # runs only if the real class is used on load
        marker.write_text(f"{type(self).__module__}.{type(self).__name__} ran")
        self.__dict__.update(state)

    return __setstate__


LIGHTNING_MODULES = (
    "pytorch_lightning.callbacks.model_checkpoint",
    "pytorch_lightning.utilities.parsing",
    "pytorch_lightning.trainer.states",
    "omegaconf.dictconfig",
)


@contextmanager
def lightning_classes(marker: Path) -> Iterator[dict[str, type]]:
    """Stand-ins for ModelCheckpoint, AttributeDict, TrainerFn and DictConfig whose code, if it ever ran on
    load, would write ``marker``."""
    with fake_modules(*LIGHTNING_MODULES) as mods:
        setstate = _marking_setstate(marker)
        model_checkpoint = _define(
            mods["pytorch_lightning.callbacks.model_checkpoint"],
            "ModelCheckpoint",
            (),
            {"__init__": lambda self, **kw: self.__dict__.update(kw), "__setstate__": setstate},
        )
        attribute_dict = _define(mods["pytorch_lightning.utilities.parsing"], "AttributeDict", (dict,), {})
        trainer_fn = enum.Enum(  # type: ignore[misc]
            "TrainerFn", {"FITTING": "fit", "TESTING": "test"}, module="pytorch_lightning.trainer.states"
        )
        mods["pytorch_lightning.trainer.states"].TrainerFn = trainer_fn  # type: ignore[attr-defined]
        dict_config = _define(
            mods["omegaconf.dictconfig"],
            "DictConfig",
            (),
            {
                "__init__": lambda self, content: self.__dict__.update(_content=content, _metadata=None),
                "__setstate__": setstate,
            },
        )
        yield {
            "ModelCheckpoint": model_checkpoint,
            "AttributeDict": attribute_dict,
            "TrainerFn": trainer_fn,
            "DictConfig": dict_config,
        }


def lightning_checkpoint(state_dict: dict[str, Tensor], classes: dict[str, type]) -> dict[str, Any]:
    """A dict shaped like a pytorch_lightning 1.x checkpoint of CompVis training."""
    mc = classes["ModelCheckpoint"]
    return {
        "epoch": 3,
        "global_step": np.int64(1234),
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state_dict,
        "callbacks": {
            mc: {"best_model_score": torch.tensor(0.5), "monitor": None, "current_score": np.float64(0.25)}
        },
        "optimizer_states": [
            {
                "state": {0: {"exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": np.float32(1e-4), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"_last_lr": [1e-4], "base_lrs": [1e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": classes["AttributeDict"](
            args=argparse.Namespace(base=["configs/x.yaml"], seed=np.int64(23), scale_lr=True),
            model_cfg=classes["DictConfig"]({"base_learning_rate": 1e-4, "target": "ldm.models.X"}),
            stage=classes["TrainerFn"].FITTING,
            checkpoint_callback=mc(dirpath="logs/ckpts", save_top_k=3),
            dtype=np.dtype("float32"),
        ),
    }


def save_torch(obj: object, path: Path, *, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


class Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint runs on a plain ``pickle.load``."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args
