"""Compile a model's Triton kernels in parallel before its first call: the cold-start half of the fast path.

Why: the fused kernels are JIT-compiled on first use, one variant per tile configuration, dtype and
specialisation -- 46 variants for the SD-1.5 UNet + kl-f8 decoder at 512 px. Compiled one after another as
the first forward reaches them, they took 9.5 s of the UNet's first call and 3.8 s of the decoder's on an
H200 with an empty Triton cache (``bench/cold_start.py``), most of the time to the first image.

How: :func:`precompile_kernels` runs the call once with every fused module of the model *recording* its
Triton launches (:class:`~ldm_sdk.accel.triton_kernels.KernelRecorder`) instead of making them -- the
library ops (convolutions, GEMMs, attention) still run, on outputs the skipped kernels left unwritten, and
the result is thrown away -- then compiles the distinct recorded variants on a thread pool through Triton's
own ``warmup`` (compile without launching), which fills the same in-process and on-disk caches a launch
would, and loads each binary with its launcher (Triton builds a small C launcher per kernel signature at a
kernel's first launch: left there, those builds ran one after another inside the first call, 1.8 s of
the SD-1.5 UNet's on an H100). Triton's compiler spends most of its time outside the GIL (MLIR / LLVM
passes, ``ptxas``, the launcher's C compiler), so the threads overlap. The real first call then finds every
kernel ready: cold first image 9.3 -> 4.7 s (``bench/cold_start.py``, H100).

:class:`~ldm_sdk.accel.graphs.CapturedModel` does this before it captures a new call shape; the task runner
does it before the first decode of a latent size. Models without fused modules (CPU, float32) are left
alone: nothing is recorded and the call is not made.

Limits: while it records, the model's fused modules skip their kernels, so the same model must not be
called from another thread meanwhile (the runtime's job queue runs one job at a time; ``CapturedModel``
records under its capture lock).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldm_sdk.accel.triton_kernels import KernelRecorder, Launch, TensorDescriptor


@dataclass(frozen=True)
class PrecompileReport:
    """What :func:`precompile_kernels` did: launches recorded, distinct variants compiled, threads, and the
    wall time of the recording call and of the compilation."""

    launches: int
    variants: int
    threads: int
    record_s: float
    compile_s: float

    def __str__(self) -> str:
        return (
            f"pre-compiled {self.variants} kernel variants ({self.launches} launches recorded) on "
            f"{self.threads} threads in {self.compile_s:.2f} s (recording call {self.record_s:.2f} s)"
        )


def recording_modules(modules: Iterable[object]) -> list[Any]:
    """The submodules that launch fused kernels (their class has a ``kernel_recorder`` slot); a plain
    object in ``modules`` (not an ``nn.Module``, such as the captured guided step of
    :mod:`ldm_sdk.accel.guided_step`) counts itself when its class has the slot."""
    seen: dict[int, Any] = {}
    for root in modules:
        for m in root.modules() if isinstance(root, nn.Module) else (root,):
            if hasattr(type(m), "kernel_recorder"):
                seen.setdefault(id(m), m)
    return list(seen.values())


def _spec(value: Any) -> Hashable:
    """What Triton specialises a launch argument on: a tensor's dtype, device and 16-byte alignment; an
    int's divisibility by 16 and being 1; a TMA descriptor's dtype, device and block; other values as they
    are."""
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.device, value.data_ptr() % 16 == 0)
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return ("descriptor", value.base.dtype, value.base.device, tuple(value.block_shape))
    if isinstance(value, float):
        return ("float",)  # floats are not specialised on
    if isinstance(value, bool) or not isinstance(value, int):
        return value if isinstance(value, Hashable) else repr(value)
    return ("int", value % 16 == 0, value == 1)


def _variant(launch: Launch) -> Hashable:
    """Positional arguments by their specialisation; keyword arguments (constexprs, launch options such
    as ``num_warps``) by value."""
    kwargs = tuple(sorted((k, v if isinstance(v, Hashable) else repr(v)) for k, v in launch.kwargs.items()))
    return (id(launch.kernel), tuple(_spec(a) for a in launch.args), kwargs)


def _device(launch: Launch) -> torch.device | None:
    for a in launch.args:
        if isinstance(a, Tensor):
            return a.device
        if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
            return a.base.device
    return None


def _compile(launch: Launch) -> None:
    device = _device(launch)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # Triton compiles for (and caches under) the thread's current device
    compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    # load the binary and build its launcher here too, off the critical path: left to the first launch, it
    # happens there one kernel after another (Triton compiles a launcher per kernel signature)
    init = getattr(compiled, "_init_handles", None)
    if callable(init):
        init()


def default_threads() -> int:
    """One compile thread per usable core, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores))


def precompile_kernels(
    modules: Sequence[object], call: Callable[[], object], *, threads: int | None = None
) -> PrecompileReport:
    """Record the Triton launches ``call()`` makes through the fused modules of ``modules`` (see
    :func:`recording_modules`) and compile the distinct variants on ``threads`` threads (default
    :func:`default_threads`); see the module doc. ``call``'s result is discarded. Returns what was done (all
    zeros when nothing launches fused kernels)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    fused = recording_modules(modules)
    if not fused:
        return PrecompileReport(0, 0, 0, 0.0, 0.0)
    recorder = KernelRecorder()
    start = time.perf_counter()
    for m in fused:
        m.kernel_recorder = recorder
    try:
        with torch.inference_mode():
            call()
    finally:
        for m in fused:
            m.__dict__.pop("kernel_recorder", None)  # back to the class default (None)
    record_s = time.perf_counter() - start
    unique = list({_variant(launch): launch for launch in recorder.launches}.values())
    # kernels with matrix products (tl.dot: software pipelines, wgmma) compile several times longer than
    # the elementwise / reduction ones: start them first, so they do not finish alone at the end
    unique.sort(key=lambda launch: "tl.dot" not in getattr(launch.kernel, "src", ""))
    workers = min(threads or default_threads(), max(1, len(unique)))
    start = time.perf_counter()
    if unique:
        with ThreadPoolExecutor(workers, thread_name_prefix="ldm-sdk-compile") as pool:
            for future in [pool.submit(_compile, launch) for launch in unique]:
                future.result()  # re-raise a compile error here, in the caller's thread
    return PrecompileReport(len(recorder), len(unique), workers, record_s, time.perf_counter() - start)


PRECOMPILED_ATTR = "precompiled_for"


def precompile_once(
    module: nn.Module, key: Hashable, call: Callable[[], object], *, threads: int | None = None
) -> PrecompileReport | None:
    """:func:`precompile_kernels` for ``module`` unless it was done for ``key`` (a call shape) before; the
    keys done are kept on the module (attribute ``precompiled_for``). None when skipped."""
    done: set[Hashable] = module.__dict__.setdefault(PRECOMPILED_ATTR, set())
    if key in done:
        return None
    report = precompile_kernels([module], call, threads=threads)
    done.add(key)
    return report


__all__ = [
    "PrecompileReport",
    "default_threads",
    "precompile_kernels",
    "precompile_once",
    "recording_modules",
]
