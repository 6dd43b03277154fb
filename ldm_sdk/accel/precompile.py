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

Threads, not processes, by default: worker processes (:mod:`ldm_sdk.kernels.compile_workers`, the
``processes`` option) compiled the UNet's 53 variants no faster on 16- and 32-core H100 machines (4.2-4.5 s
against 3.9-5.1 s, ``bench/probe_precompile_threads.py``): the compilation is bound by the cores, not the
GIL. They pay where the caller has other work meanwhile: :mod:`ldm_sdk.accel.compile_ahead`.

Limits: while it records, the model's fused modules skip their kernels, so the same model must not be
called from another thread meanwhile (the runtime's job queue runs one job at a time; ``CapturedModel``
records under its capture lock).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ldm_sdk.accel.triton_kernels import KernelRecorder, Launch, TensorDescriptor, TensorStandIn

if TYPE_CHECKING:
    from ldm_sdk.kernels.compile_workers import CompileWorkers, KernelJob


@dataclass(frozen=True)
class PrecompileReport:
    """What :func:`precompile_kernels` did: launches recorded, distinct variants compiled, threads, and the
    wall time of the recording call and of the compilation."""

    launches: int
    variants: int
    threads: int
    record_s: float
    compile_s: float
    processes: int = 0  # worker processes used (ldm_sdk.kernels.compile_workers)
    in_process: int = 0  # variants compiled on this process's threads (all of them without workers)
    worker_s: float = 0.0  # seconds of compiling (and building launchers) in the workers, summed
    slowest_s: float = 0.0  # the slowest variant's seconds (in a worker, or on a thread here)
    slowest: str = ""  # its kernel
    load_s: float = 0.0  # seconds loading the workers' variants in this process, summed

    def __str__(self) -> str:
        where = f"{self.processes} worker processes, {self.in_process} variants on " if self.processes else ""
        return (
            f"pre-compiled {self.variants} kernel variants ({self.launches} launches recorded) on "
            f"{where}{self.threads} threads in {self.compile_s:.2f} s (recording call {self.record_s:.2f} s)"
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
    if isinstance(value, (Tensor, TensorStandIn)):
        return ("tensor", value.dtype, value.device, value.data_ptr() % 16 == 0)
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):
        return ("descriptor", value.base.dtype, value.base.device, tuple(value.block_shape))
    if isinstance(value, float):
        return ("float",)  # floats are not specialised on
    if isinstance(value, bool) or not isinstance(value, int):
        return value if isinstance(value, Hashable) else repr(value)
    return ("int", value % 16 == 0, value == 1)


def _hashable(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else repr(value)


def _variant(launch: Launch) -> Hashable:
    """What tells ``launch``'s compiled variant apart, as Triton sees it: a JIT function's parameters
    (given by position or by name) each by its specialisation (:func:`_spec`), a ``tl.constexpr`` by value
    and a ``do_not_specialize`` one by its Python type only (so run-time flags do not split variants);
    other keyword arguments (launch options such as ``num_warps``) by value. Kernels without Triton's
    parameter list: positional arguments by specialisation, keyword arguments by value."""
    params = getattr(launch.kernel, "params", None)
    if params is None:
        kwargs = tuple(sorted((k, _hashable(v)) for k, v in launch.kwargs.items()))
        return (id(launch.kernel), tuple(_spec(a) for a in launch.args), kwargs)
    names = [p.name for p in params]
    bound = dict(zip(names, launch.args, strict=False)) | launch.kwargs
    key: list[Hashable] = []
    for p in params:
        if p.name not in bound:
            key.append(None)  # the parameter's default
        elif p.is_constexpr:
            key.append(_hashable(bound[p.name]))
        elif p.do_not_specialize:
            key.append(("unspecialised", type(bound[p.name]).__name__))
        else:
            key.append(_spec(bound[p.name]))
    options = tuple(sorted((k, _hashable(v)) for k, v in launch.kwargs.items() if k not in names))
    return (id(launch.kernel), tuple(key), options)


def _device(launch: Launch) -> torch.device | None:
    for a in launch.args:
        if isinstance(a, (Tensor, TensorStandIn)):
            return a.device
        if TensorDescriptor is not None and isinstance(a, TensorDescriptor):
            return a.base.device  # type: ignore[no-any-return]
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
    """One compile thread (or worker process) per usable core, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cores))


def default_processes() -> int:
    """Worker processes a background compilation (:mod:`ldm_sdk.accel.compile_ahead`) starts when it is not
    told: :func:`default_threads` where CUDA is available, Triton compiles real kernels (not the
    interpreter) and ``sys.executable`` is a Python interpreter to start them with; else 0 (none)."""
    from ldm_sdk.kernels.compile_workers import python_executable

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or python_executable() is None:
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        return 0
    return default_threads() if torch.cuda.is_available() else 0


@dataclass
class _CompileTimes:
    worker_s: float = 0.0  # compile + launcher seconds in the workers, summed
    slowest_s: float = 0.0  # the slowest variant's seconds (in a worker: compile + launcher)
    slowest: str = ""
    load_s: float = 0.0  # loading the variants here (binary and launcher from the cache)


def _kernel_name(kernel: Any) -> str:
    return str(getattr(getattr(kernel, "fn", kernel), "__name__", type(kernel).__name__))


def _timed_compile(launch: Launch) -> float:
    start = time.perf_counter()
    _compile(launch)
    return time.perf_counter() - start


def _compile_on_threads(launches: Sequence[Launch], threads: int, times: _CompileTimes) -> None:
    from ldm_sdk.kernels.compile_workers import triton_install_key

    with contextlib.suppress(ImportError):
        triton_install_key()  # once here: every thread that found it missing would hash Triton's library
    with ThreadPoolExecutor(threads, thread_name_prefix="ldm-sdk-compile") as pool:
        futures = [pool.submit(_timed_compile, launch) for launch in launches]
        for launch, future in zip(launches, futures, strict=True):
            spent = future.result()  # re-raise a compile error here, in the caller's thread
            if spent > times.slowest_s:
                times.slowest_s, times.slowest = spent, _kernel_name(launch.kernel)


def worker_target(launch: Launch) -> tuple[torch.device, tuple[str, str]] | None:
    """Where a compile worker could compile ``launch``'s variant: its CUDA device and the JIT function's
    (module, name); None when a worker cannot take it (not a CUDA launch of an importable JIT function)."""
    from ldm_sdk.kernels.compile_workers import jit_function

    device = _device(launch)
    name = jit_function(launch.kernel)
    if device is None or device.type != "cuda" or name is None:
        return None
    return device, name


def worker_job(launch: Launch, device: torch.device, name: tuple[str, str]) -> KernelJob | None:
    """The compile-worker job for ``launch`` (see :func:`worker_target`); None when this process has
    compiled that variant already."""
    from ldm_sdk.kernels.compile_workers import KernelJob, current_target, specialization_of

    with torch.cuda.device(device):  # Triton specialises for the current device
        spec = specialization_of(launch.kernel, launch.args, launch.grid, launch.kwargs)
        return None if spec is None else KernelJob(*name, spec, current_target(device.index or 0))


def worker_jobs(launches: Sequence[Launch]) -> tuple[dict[KernelJob, Launch], list[Launch]]:
    """The compile-worker jobs for ``launches`` (one per distinct variant, with a launch of it) and the
    launches a worker cannot take (compiled here). Variants this process has compiled already are in
    neither."""
    jobs: dict[KernelJob, Launch] = {}
    left: list[Launch] = []
    for launch in launches:
        where = worker_target(launch)
        if where is None:
            left.append(launch)
        elif (job := worker_job(launch, *where)) is not None:
            jobs.setdefault(job, launch)
    return jobs, left


def _compile_in_workers(
    launches: Sequence[Launch], workers: CompileWorkers, times: _CompileTimes
) -> list[Launch]:
    """Send the launches' variants to ``workers`` and load each here as it comes back (a cache hit);
    returns the launches left to compile in this process (no specialization to send, or failed there)."""
    sent, left = worker_jobs(launches)
    for job in sent:
        workers.submit(job)
    for result in workers.results():
        launch = sent[result.job]
        if not result.ok:
            left.append(launch)
            continue
        spent = result.compile_s + result.launcher_s
        times.worker_s += spent
        if spent > times.slowest_s:
            times.slowest_s, times.slowest = spent, result.job.name
        start = time.perf_counter()
        _compile(launch)  # Triton finds the binary (and the launcher) in its on-disk cache
        times.load_s += time.perf_counter() - start
    return left


@contextlib.contextmanager
def recording(modules: Sequence[object], *, keep_tensors: bool = True) -> Iterator[KernelRecorder]:
    """Within the block, the fused modules of ``modules`` (:func:`recording_modules`) record their Triton
    launches into the yielded recorder instead of making them; their slots are restored on exit, also when
    the block raises. ``keep_tensors``: see :class:`~ldm_sdk.accel.triton_kernels.KernelRecorder`."""
    recorder = KernelRecorder(keep_tensors=keep_tensors)
    fused = recording_modules(modules)
    for m in fused:
        m.kernel_recorder = recorder
    try:
        yield recorder
    finally:
        for m in fused:
            m.__dict__.pop("kernel_recorder", None)  # back to the class default (None)


def record_launches(modules: Sequence[object], call: Callable[[], object]) -> tuple[list[Launch], int, float]:
    """Run ``call()`` once with the fused modules of ``modules`` recording their Triton launches instead of
    making them; returns the distinct variants (one launch each, those with matrix products first), the
    number of launches recorded and the seconds the call took. Nothing is run when no module is fused."""
    if not recording_modules(modules):
        return [], 0, 0.0
    start = time.perf_counter()
    # stand-ins recorded: the call's activations are freed as it goes (kept, they would all stay alive)
    with recording(modules, keep_tensors=False) as recorder, torch.inference_mode():
        call()
    record_s = time.perf_counter() - start
    unique = list({_variant(launch): launch for launch in recorder.launches}.values())
    # kernels with matrix products (tl.dot: software pipelines, wgmma) compile several times longer than
    # the elementwise / reduction ones: start them first, so they do not finish alone at the end
    unique.sort(key=lambda launch: "tl.dot" not in getattr(launch.kernel, "src", ""))
    return unique, len(recorder), record_s


def precompile_kernels(
    modules: Sequence[object],
    call: Callable[[], object],
    *,
    threads: int | None = None,
    processes: int = 0,
) -> PrecompileReport:
    """Record the Triton launches ``call()`` makes through the fused modules of ``modules`` (see
    :func:`recording_modules`) and compile the distinct variants on ``threads`` threads (default
    :func:`default_threads`); with ``processes`` > 0 in that many worker processes first
    (:mod:`ldm_sdk.kernels.compile_workers`, started before the recording call so their start-up overlaps
    it), the threads taking what the workers could not. ``call``'s result is discarded. Returns what was
    done (all zeros when nothing launches fused kernels).

    Threads are the default: for this synchronous pre-compilation worker processes were no faster on 16-
    and 32-core H100 machines (the compilation is bound by the cores; ``bench/probe_precompile_threads.py``);
    they pay for compiling in the background (:mod:`ldm_sdk.accel.compile_ahead`)."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    if not recording_modules(modules):
        return PrecompileReport(0, 0, 0, 0.0, 0.0)
    workers = _start_workers(processes)
    started = workers.processes if workers is not None else 0
    try:
        unique, launches, record_s = record_launches(modules, call)
        start = time.perf_counter()
        times = _CompileTimes()
        left = _compile_in_workers(unique, workers, times) if workers is not None else unique
        used = min(threads or default_threads(), max(1, len(left)))
        if left:
            _compile_on_threads(left, used, times)
    finally:
        if workers is not None:
            workers.close()
    return PrecompileReport(
        launches,
        len(unique),
        used if left else 0,
        record_s,
        time.perf_counter() - start,
        processes=started,
        in_process=len(left),
        worker_s=times.worker_s,
        slowest_s=times.slowest_s,
        slowest=times.slowest,
        load_s=times.load_s,
    )


def _start_workers(processes: int) -> CompileWorkers | None:
    """``processes`` compile workers, or None (none wanted, or they could not be started: the threads
    compile everything then)."""
    if processes < 1:
        return None
    from ldm_sdk.kernels.compile_workers import CompileWorkers, triton_install_key

    try:  # the workers take this process's Triton key instead of hashing Triton's library each
        return CompileWorkers(processes, triton_key=triton_install_key())
    except (OSError, RuntimeError, ImportError):
        return None


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
    "default_processes",
    "default_threads",
    "precompile_kernels",
    "precompile_once",
    "record_launches",
    "recording",
    "recording_modules",
    "worker_job",
    "worker_jobs",
    "worker_target",
]
