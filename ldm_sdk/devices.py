"""Device and dtype policy of the runtime.

Device: the argument, else ``$LDM_SDK_DEVICE``, else the first available of cuda > mps > cpu.
Dtype: the argument, else ``$LDM_SDK_DTYPE``, else bf16 on a CUDA device that supports it, fp16 on other
CUDA devices and on MPS, fp32 on CPU. On CPU only fp32 and bf16 are allowed (fp16 convolutions there are slow
and incomplete); bf16 on a CUDA device without bf16 support is refused.

Both functions take an :class:`Accelerators` snapshot so tests can drive them with fake availability.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEVICE_ENV = "LDM_SDK_DEVICE"
DTYPE_ENV = "LDM_SDK_DTYPE"

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Accelerators:
    """What this process can use: CUDA devices (and whether they do bf16) and Apple MPS."""

    cuda_count: int = 0
    cuda_bf16: bool = False
    mps: bool = False

    @classmethod
    def probe(cls) -> Accelerators:
        """Ask torch. Initialises CUDA only when a CUDA device is present."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        bf16 = bool(count) and torch.cuda.is_bf16_supported()
        mps_backend = getattr(torch.backends, "mps", None)
        mps = bool(mps_backend is not None and mps_backend.is_available())
        return cls(cuda_count=count, cuda_bf16=bf16, mps=mps)

    def available(self) -> list[str]:
        return [*(f"cuda:{i}" for i in range(self.cuda_count)), *(["mps"] if self.mps else []), "cpu"]


def select_device(
    requested: str | torch.device | None = None,
    *,
    accelerators: Accelerators | None = None,
    env: Mapping[str, str] | None = None,
) -> torch.device:
    """The device to run on; an unavailable request raises ``ValueError`` listing the available ones."""
    env = os.environ if env is None else env
    if requested is None and env.get(DEVICE_ENV, "").strip():
        requested = env[DEVICE_ENV].strip()
    acc = accelerators if accelerators is not None else Accelerators.probe()
    if requested is None:
        if acc.cuda_count:
            return torch.device("cuda", 0)
        return torch.device("mps" if acc.mps else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {requested!r}; available: {', '.join(acc.available())}") from exc
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if index >= acc.cuda_count:
            raise ValueError(
                f"device {requested!r} is not available ({acc.cuda_count} CUDA device(s)); "
                f"available: {', '.join(acc.available())}"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not acc.mps:
        raise ValueError(f"device 'mps' is not available; available: {', '.join(acc.available())}")
    if device.type not in ("cpu", "mps"):
        raise ValueError(f"unsupported device {requested!r}; available: {', '.join(acc.available())}")
    return device


def select_dtype(
    device: torch.device,
    requested: str | torch.dtype | None = None,
    *,
    accelerators: Accelerators | None = None,
    env: Mapping[str, str] | None = None,
) -> torch.dtype:
    """The compute dtype for ``device`` under the policy in the module docstring."""
    env = os.environ if env is None else env
    if requested is None and env.get(DTYPE_ENV, "").strip():
        requested = env[DTYPE_ENV].strip()
    if device.type == "cuda":
        acc = accelerators if accelerators is not None else Accelerators.probe()
        bf16_ok = acc.cuda_bf16
    else:
        bf16_ok = True
    if requested is None:
        if device.type == "cuda":
            return torch.bfloat16 if bf16_ok else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    dtype = parse_dtype(requested)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype fp16 is not supported on CPU; valid on CPU: fp32 (the default), bf16")
    if dtype == torch.bfloat16 and not bf16_ok:
        raise ValueError(f"dtype bf16 is not supported on {device}; valid there: fp16 (the default), fp32")
    return dtype


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"fp16"``, ``"bfloat16"``, ``torch.float32`` ... -> a torch dtype; anything else raises ValueError."""
    if isinstance(value, torch.dtype):
        if value in _SHORT:
            return value
        raise ValueError(f"unsupported dtype {value}; valid: fp32, fp16, bf16")
    found = _DTYPES.get(str(value).strip().lower().removeprefix("torch."))
    if found is None:
        raise ValueError(f"unknown dtype {value!r}; valid: {', '.join(_DTYPES)}")
    return found


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"`` (the spelling used in cache keys and listings)."""
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))
