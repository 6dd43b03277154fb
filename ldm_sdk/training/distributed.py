"""One process or many: DDP/FSDP set-up from torchrun's environment, rank-0 logging, gradient averaging.

Launch (the scripts read ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` that
torchrun sets; with none set they run as one process)::

    # one GPU (or the CPU)
    python -m ldm_sdk.training.train_ldm --config ldm.yaml
    # 2 GPUs on this machine
    torchrun --standalone --nproc_per_node=2 -m ldm_sdk.training.train_ldm --config ldm.yaml
    # 2 nodes x 8 GPUs: run on every node (same --rdzv-id, endpoint = one node's address)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --rdzv-id=ldm-run-1 -m ldm_sdk.training.train_ldm --config ldm.yaml

Backend: NCCL when the device is CUDA, gloo otherwise (CPU processes). Every process computes; rank 0
alone logs, writes samples and saves checkpoints (:func:`rank_zero_logger`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldm_sdk.devices import DEVICE_ENV

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer (torchrun sets it to one)") from None


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """The training device: ``requested``, else ``$LDM_SDK_DEVICE``, else ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU. ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
    text = requested or os.environ.get(DEVICE_ENV, "").strip() or None
    if text is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {text!r}; valid: cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} asked for, but CUDA is not available here; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices)")
        device = torch.device("cuda", index)
    return device


def setup(
    requested_device: str | None = None, *, deterministic: bool = False, timeout_s: float = 1800.0
) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this process's device.

    With ``WORLD_SIZE`` unset or 1 this is a single process and no group is created. ``deterministic``
    selects deterministic kernels (cuBLAS workspace, no cuDNN autotuning): on CUDA, a resumed run then
    repeats an uninterrupted one bit for bit, as it always does on the CPU.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world_size} are inconsistent")
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistInfo(), device
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {missing} unset: launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend), device


def cleanup(info: DistInfo) -> None:
    """Leave the process group (a no-op for one process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def rank_zero_logger(
    info: DistInfo, name: str, log_file: str | os.PathLike[str] | None = None
) -> logging.Logger:
    """A logger that prints on rank 0 (to stderr and ``log_file``) and is silent on the other ranks."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if info.is_main else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if info.is_main:
        fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if log_file is not None:
            handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        for handler in handlers:
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def all_reduce_mean(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (the same dict on one process)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def average_gradients(parameters: Iterable[nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean) the ``.grad`` of ``parameters`` across ranks, coalesced into one flat buffer per
    dtype. Used where DDP's reducer does not fit (the autoencoder's GAN step: gradients taken with
    ``autograd.grad`` at the decoder's last layer, the discriminator run twice per step)."""
    if not info.enabled:
        return
    grads: dict[torch.dtype, list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            grads.setdefault(p.grad.dtype, []).append(p.grad)
    for group in grads.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat.div_(info.world_size)
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def broadcast_module(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (same start on all of them)."""
    if not info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's ``obj`` (in rank order) on every rank; ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(
    module: nn.Module, info: DistInfo, device: torch.device, *, find_unused: bool = False
) -> nn.Module:
    """``DistributedDataParallel(module)`` on several processes, else ``module`` unchanged. ``find_unused``
    for modules with parameters a step may not use (LDM BERT's ``to_logits`` head)."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused
    )


def shard_unet(unet: nn.Module, info: DistInfo, *, mixed_bf16: bool = False) -> nn.Module:
    """FSDP2 (``fully_shard``) over the UNet: each input/middle/output block is a unit, then the root.

    Parameters become DTensors sharded across ranks (the EMA shadows shard with them); gradients are
    reduce-scattered, so the module wrapping the UNet must not also be DDP. ``mixed_bf16`` computes in bf16
    with fp32 master weights and fp32 gradient reduction.
    """
    if not info.enabled:
        return unet
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    )
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for name in ("input_blocks", "output_blocks"):
        for block in getattr(unet, name, []):
            fully_shard(block, **kwargs)
    middle = getattr(unet, "middle_block", None)
    if middle is not None:
        fully_shard(middle, **kwargs)
    fully_shard(unet, **kwargs)
    return unet


# -- FSDP-aware state dicts (plain state dicts when nothing is sharded) -------------------------------------
def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds FSDP2 (DTensor) parameters."""
    return any(hasattr(p, "device_mesh") for p in module.parameters())


def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def reshard(module: nn.Module) -> None:
    """Free the unsharded parameters FSDP2 keeps after a forward outside training (a no-op otherwise)."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def full_compvis_state(bundle: Any, info: DistInfo) -> dict[str, Tensor]:
    """``bundle.compvis_state_dict()`` with a sharded UNet gathered (a collective: every rank calls it; the
    full dict is on rank 0, the others get an empty one)."""
    if bundle.model is None or not is_sharded(bundle.unet):
        return bundle.compvis_state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ldm_sdk.checkpoints.bundle import UNET_PREFIX

    unet = get_model_state_dict(bundle.unet, options=_options(cpu_offload=True))
    if not info.is_main:
        return {}
    out = {}
    for key, value in bundle.compvis_state_dict().items():
        out[key] = unet[key[len(UNET_PREFIX) :]] if key.startswith(UNET_PREFIX) else value
    return out


def load_full_state(module: nn.Module, state: dict[str, Tensor], info: DistInfo) -> None:
    """Load a full (unsharded) state dict strictly, into a plain or an FSDP2-sharded module."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options())


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, module: nn.Module, info: DistInfo
) -> dict[str, Any]:
    """The optimizer's state dict, unsharded (``module`` holds every parameter the optimizer trains)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, module: nn.Module, state: dict[str, Any], info: DistInfo
) -> None:
    """Inverse of :func:`full_optimizer_state`."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=_options())


__all__ = [
    "ENV_VARS",
    "DistInfo",
    "all_reduce_mean",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "cleanup",
    "full_compvis_state",
    "full_optimizer_state",
    "gather_objects",
    "is_sharded",
    "load_full_state",
    "load_optimizer_state",
    "rank_zero_logger",
    "reshard",
    "resolve_device",
    "setup",
    "shard_unet",
    "wrap_ddp",
]
