"""Training options as typed pydantic models, read from a YAML file and command-line flags.

Each training script declares its ``TrainConfig`` (a :class:`BaseTrainConfig` subclass) at its top, and
:func:`parse_config` turns argv into it: every field becomes a ``--field-name`` flag (booleans get
``--flag`` / ``--no-flag``); ``--config FILE.yaml`` supplies values first, and flags given on the command line
override them. Values of non-string fields are read as YAML scalars or flow collections, so
``--adam-betas "[0.5, 0.9]"`` and ``--cond-params '{"embed_dim": 32}'`` work; ``none`` clears an optional
field. Unknown YAML keys and invalid values are refused with the valid choices.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Precision = Literal["fp32", "bf16"]


class BaseTrainConfig(BaseModel):
    """Options every training script shares (run folder, data, batch, optimisation, logging, devices)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    out_dir: Path = Field(Path("runs/train"), description="run folder: checkpoints, samples, log")
    data: str | None = Field(
        None,
        description="dataset spec: folder:PATH, fashion_mnist, scenes, latents:PATH or synthetic:N "
        "(see ldm_sdk.training.batches)",
    )
    data_options: dict[str, Any] = Field(
        default_factory=dict, description='options of the data set as JSON, e.g. {"mask": "box"}'
    )
    image_size: int = Field(32, gt=0, description="training resolution (square images)")
    batch_size: int = Field(4, gt=0, description="per-process micro-batch; global = this * world size")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_steps: int = Field(1000, ge=0, description="optimizer steps to train (resume continues to this)")
    lr: float = Field(1e-4, gt=0, description="learning rate (not scaled by batch size)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps (0: none)")
    grad_clip: float = Field(0.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    seed: int = Field(0, description="seed of the model init, the data order and every training draw")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    precision: Precision = Field("fp32", description="fp32, or bf16 autocast (CUDA and CPU)")
    device: str | None = Field(
        None,
        description="torch device; default $LDM_SDK_DEVICE, else cuda:LOCAL_RANK if CUDA is there, else cpu",
    )
    deterministic: bool = Field(
        False, description="deterministic kernels (needed for bit-exact resume on CUDA; slower)"
    )
    log_every: int = Field(10, gt=0, description="log the averaged losses every N steps")
    save_every: int = Field(
        1000, ge=0, description="write a training checkpoint every N steps (0: only at the end)"
    )
    keep_last: int = Field(2, ge=1, description="how many step checkpoints to keep besides last.ckpt")
    resume: Path | None = Field(
        None, description="training checkpoint to resume from ('auto': OUT_DIR/last.ckpt when it exists)"
    )


Cfg = TypeVar("Cfg", bound=BaseTrainConfig)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), optional
    return annotation, False


def _converter(annotation: Any, optional: bool) -> Any:
    def convert(text: str) -> object:
        if optional and text.strip().lower() in ("none", "null", "~"):
            return None
        if annotation in (str, Path):
            return text
        if annotation is not str and typing.get_origin(annotation) is Literal:
            return text
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text

    return convert


def build_parser(cls: type[BaseTrainConfig], *, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` (defaults suppressed: only given flags)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="YAML", help="YAML file of these options; flags override it")
    for name, field in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation, optional = _unwrap(field.annotation)
        value = field.get_default(call_default_factory=True)
        default = "none" if value is None else value
        text = f"{field.description or ''} (default: {default})"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
            continue
        choices = None
        if typing.get_origin(annotation) is Literal:
            choices = [str(c) for c in typing.get_args(annotation)] + (["none"] if optional else [])
        parser.add_argument(
            flag,
            dest=name,
            type=_converter(annotation, optional),
            metavar=name.upper(),
            help=text + (f"; one of {', '.join(choices)}" if choices else ""),
        )
    return parser


def load_yaml_options(path: str | Path, cls: type[BaseTrainConfig]) -> dict[str, Any]:
    """The options mapping of a YAML file; keys may use ``-`` or ``_``; unknown keys are refused."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read the training config {path}: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: a training config must be a mapping of option: value, got {type(raw).__name__}"
        )
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(cls.model_fields))
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; valid options: {sorted(cls.model_fields)}")
    return values


def parse_config(cls: type[Cfg], argv: Sequence[str] | None, *, prog: str, description: str = "") -> Cfg:
    """``cls`` from ``--config YAML`` and the flags in ``argv`` (None: ``sys.argv[1:]``)."""
    parser = build_parser(cls, prog=prog, description=description or (cls.__doc__ or ""))
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        values.update(load_yaml_options(config_path, cls))
    values.update(args)
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{prog}: invalid options: {problems}") from None


__all__ = ["BaseTrainConfig", "Precision", "build_parser", "load_yaml_options", "parse_config"]
