"""CPU inference settings: bf16 weights where the CPU computes bf16 natively, channels_last, threads, the
cross-attention K/V cache and weights prepacked for oneDNN / MKL.

:func:`configure_cpu_inference` prepares modules (UNet, first stage ...) for sampling on the CPU:

* **dtype**: bf16 weights when the CPU has native bf16 arithmetic -- x86 ``avx512_bf16`` or AMX
  (``amx_bf16``), aarch64 ``bf16`` -- and torch's vector code runs at AVX-512 level there; fp32 otherwise
  (oneDNN would emulate bf16, which is slower than fp32). The UNet computes in its parameters' dtype and
  returns its input's dtype, so the samplers keep their float32 state unchanged; a first stage is called
  with latents cast to its dtype (``z.to(cpu.dtype)``).
* **channels_last** for 4-D weights (convolutions), which oneDNN prefers for bf16 convolutions.
* **threads**: ``torch.set_num_threads`` to the cores this process may run on (``os.sched_getaffinity``,
  which respects cgroup / taskset limits, unlike ``os.cpu_count``).
* **K/V cache** (``cache_kv``): the context projections of every cross-attention are computed once per
  context instead of at every step (:mod:`ldm_sdk.accel.kv_cache`; exact: bit-identical outputs).
* **prepacked weights** (``prepack``): Conv2d / Linear weights reordered once into oneDNN's (bf16) or MKL's
  (fp32 Linear) blocked layout instead of at every call (:mod:`ldm_sdk.accel.cpu_prepack`; bit-identical
  to the eager channels_last layers in bf16, within fp32 rounding in fp32). Costs a second copy of those
  weights in memory.
* eval mode and ``requires_grad_(False)``; run the sampler under :meth:`CpuInference.inference`
  (``torch.inference_mode``).

Measured on the development VM (2 vCPUs, AMD EPYC with ``avx512_bf16``, no AMX; ``bench/bench_sampling.py
--cpu-compare``): bf16 for the convolutions and linears gains most; the K/V cache and the prepacked weights
add about 10 % on the bf16 UNet step, exactly. Attention (torch's CPU flash-attention kernel, used by
ldm_sdk and diffusers alike) is not faster in bf16 than in fp32, so where it dominates the step (small head
dims) the overall gain is smaller. ``torch.compile`` (inductor, ``freezing``) takes a further ~15 % off the
bf16 UNet step there but costs about 1.5 min of compilation per process and input shape (70 s with a warm
inductor cache) on such a machine; it is not part of this path.

:func:`cpu_features` reports what was detected (torch's CPU capability, the ``/proc/cpuinfo`` flags).
"""

from __future__ import annotations

import os
import platform
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm_sdk.accel.cpu_prepack import PrepackReport, prepack_available, prepack_cpu_weights
from ldm_sdk.accel.kv_cache import cache_context_projections
from ldm_sdk.devices import dtype_name, parse_dtype
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.attention import CrossAttention

# torch.backends.cpu.get_cpu_capability() values whose vector kernels handle bf16 with AVX-512 (x86)
_X86_WIDE = ("AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX")


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers for inference, as far as torch and the OS report it."""

    model_name: str
    machine: str  # platform.machine(): x86_64, aarch64 ...
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", "DEFAULT" ...
    flags: frozenset[str]  # /proc/cpuinfo "flags" (x86) or "Features" (arm); empty when unreadable
    usable_cores: int  # cores this process may run on

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware, usable by torch / oneDNN on this build."""
        if self.machine.lower() in ("aarch64", "arm64"):
            return "bf16" in self.flags
        return (self.avx512_bf16 or self.amx_bf16) and self.capability.upper() in _X86_WIDE

    def describe(self) -> str:
        bf16 = [name for name, ok in (("avx512_bf16", self.avx512_bf16), ("amx_bf16", self.amx_bf16)) if ok]
        if self.machine.lower() in ("aarch64", "arm64") and "bf16" in self.flags:
            bf16.append("bf16")
        return (
            f"{self.model_name} ({self.machine}), torch CPU capability {self.capability}, "
            f"bf16 hardware: {', '.join(bf16) or 'none'}, {self.usable_cores} usable core(s)"
        )


def cpu_features(
    cpuinfo: str | None = None,
    usable_cores: int | None = None,
    *,
    machine: str | None = None,
    capability: str | None = None,
) -> CpuFeatures:
    """Probe this machine. Each argument replaces its probe (for tests): ``cpuinfo`` the text of
    ``/proc/cpuinfo``, ``usable_cores`` the affinity count, ``machine`` ``platform.machine()``,
    ``capability`` ``torch.backends.cpu.get_cpu_capability()``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "", frozenset[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    if not flags and cpuinfo == "":  # no /proc/cpuinfo (macOS, Windows): ask torch what it knows
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if probe is not None and probe():
            flags = frozenset({"avx512_bf16"})
    return CpuFeatures(
        model_name=model or platform.processor() or "unknown CPU",
        machine=machine if machine is not None else platform.machine(),
        capability=capability if capability is not None else torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        usable_cores=usable_cores if usable_cores is not None else _usable_cores(),
    )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuInference:
    """What :func:`configure_cpu_inference` set, and why."""

    dtype: torch.dtype
    channels_last: bool
    threads: int
    features: CpuFeatures
    reason: str
    kv_cache_layers: int = 0  # cross-attention layers whose K/V projections are cached
    prepacked: PrepackReport | None = None  # None: not prepacked

    def inference(self) -> AbstractContextManager[None]:
        """The context to sample in: ``torch.inference_mode()``."""
        return torch.inference_mode()

    def describe(self) -> str:
        extras = (
            [f"K/V cache on {self.kv_cache_layers} cross-attention layer(s)"] if self.kv_cache_layers else []
        )
        extras += [self.prepacked.describe()] if self.prepacked is not None else []
        return (
            f"{dtype_name(self.dtype)} ({self.reason}), channels_last={self.channels_last}, "
            f"{self.threads} thread(s)" + "".join(f", {e}" for e in extras) + f"; {self.features.describe()}"
        )


def configure_cpu_inference(
    *modules: nn.Module,
    dtype: torch.dtype | str | None = None,
    channels_last: bool = True,
    threads: int | None = None,
    features: CpuFeatures | None = None,
    cache_kv: bool = True,
    prepack: bool | None = None,
) -> CpuInference:
    """Put CPU ``modules`` in inference form, in place, and set torch's thread count.

    ``dtype``: None picks bf16 where :attr:`CpuFeatures.native_bf16`, else fp32; "fp32" / "bf16" force it
    (fp16 is refused: CPU fp16 convolutions are slow and incomplete). ``threads``: None uses every usable
    core, 0 leaves torch's setting alone. ``features`` replaces the probe (tests). ``cache_kv``: cache the
    cross-attention context projections (:func:`~ldm_sdk.accel.kv_cache.cache_context_projections`, on each
    module holding a cross-attention). ``prepack``: reorder Conv2d / Linear weights once
    (:func:`~ldm_sdk.accel.cpu_prepack.prepack_cpu_weights`); None does it where this torch build has the
    oneDNN and MKL ops. Returns what was done.
    """
    if not modules:
        raise ValueError("configure_cpu_inference needs at least one module (the UNet, the first stage ...)")
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError(f"expected torch.nn.Module instances, got {type(module).__name__}")
        if any(isinstance(m, DiffusionSchedule) for m in module.modules()):
            raise ValueError(
                f"{type(module).__name__} holds a DiffusionSchedule, whose tables must stay in full "
                "precision: pass the networks (bundle.unet, bundle.first_stage_model), not the bundle"
            )
        devices = sorted({str(t.device) for t in (*module.parameters(), *module.buffers())} - {"cpu"})
        if devices:
            raise ValueError(
                f"configure_cpu_inference is for CPU modules, but {type(module).__name__} has tensors on "
                f"{', '.join(devices)}; move it with .to('cpu') first, or use ldm_sdk.accel.graphs on CUDA"
            )
    feats = features if features is not None else cpu_features()
    if dtype is None:
        chosen = torch.bfloat16 if feats.native_bf16 else torch.float32
        reason = "native bf16 on this CPU" if feats.native_bf16 else "no native bf16 on this CPU"
    else:
        chosen = parse_dtype(dtype)
        if chosen == torch.float16:
            raise ValueError("dtype fp16 is not supported on CPU; valid: fp32, bf16 (or None to choose)")
        reason = "requested" + (
            " (this CPU emulates bf16: expect it slower than fp32)"
            if chosen == torch.bfloat16 and not feats.native_bf16
            else ""
        )
    if threads is None:
        n_threads = feats.usable_cores
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(
            f"threads must be None (every usable core), 0 (keep torch's) or >= 1, got {threads!r}"
        )
    else:
        n_threads = threads
    if n_threads:
        torch.set_num_threads(n_threads)
    if prepack and not prepack_available():
        raise ValueError("prepack=True, but this torch build lacks the oneDNN / MKL prepacked ops")
    for module in modules:
        module.eval().requires_grad_(False)
        module.to(dtype=chosen)
        if channels_last:
            module.to(memory_format=torch.channels_last)
    kv_layers = 0
    if cache_kv:  # before prepacking: the cached projections run once per context and need no packing
        for module in modules:
            if any(isinstance(m, CrossAttention) for m in module.modules()):
                kv_layers += cache_context_projections(module).layers
    report = None
    if prepack or (prepack is None and prepack_available()):
        report = prepack_cpu_weights(*modules)
    return CpuInference(chosen, channels_last, torch.get_num_threads(), feats, reason, kv_layers, report)


__all__ = ["CpuFeatures", "CpuInference", "configure_cpu_inference", "cpu_features"]
