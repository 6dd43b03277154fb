"""Compile Triton kernel variants in worker processes: compilation that leaves the caller's interpreter alone.

Why: compiled on threads of the caller's process, Triton's compiler takes turns at the GIL with whatever
else the caller runs -- compiling the decoder's kernels on threads while the UNet is captured slowed the
capture as much as it hid (``bench/results/cold_start_ahead*_h100.json``). In worker processes the
compilation only competes for cores: :mod:`ldm_sdk.accel.compile_ahead` compiles the decoder's variants
this way while the sampler runs. (For a compilation the caller just waits for, workers are no faster than
threads: it is bound by the cores -- ``bench/probe_precompile_threads.py``, docs/performance-log.md.)

How: for each variant the parent asks Triton for its serialized specialization (:func:`specialization_of`:
the ``jit_cache_hook`` knob, which Triton calls just before it would compile a variant and which may skip
the compile) and sends it to worker processes (``python -m ldm_sdk.kernels.compile_workers``: one JSON job per
line on stdin, one JSON reply per line on stdout; no ``multiprocessing``, so a user's script is never
re-imported and an embedding host's executable is never started). A worker rebuilds the variant from it
(``JITFunction.preload``, the path Triton offers for compiling a recorded specialization; the kernel's
module, one of :mod:`ldm_sdk.kernels`, imports Triton alone) for the parent's
GPU target *without touching the GPU* -- a compile-only stand-in for Triton's driver answers the device and
target questions (:class:`CompileOnlyDriver`) -- and builds the variant's C launcher. Triton's on-disk cache
carries both back: the parent's own compile of the variant then finds the binary and the launcher there and
only loads them.

:class:`CompileWorkers` starts the processes at once (each imports Triton, not torch: 0.44 s for 16 at once
against 7.2 s with the launching modules, H100 machine; the caller overlaps it with its own work) and hands
out jobs as workers free up. A job that fails in a worker
comes back as a failure with the worker's error; the caller compiles that variant itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: modules a worker imports before its first job: Triton's compiler and CUDA back end (no torch: the kernel
#: modules, ``ldm_sdk.kernels.*``, import Triton alone)
WARM_IMPORTS = (
    "triton",
    "triton.language",
    "triton.compiler",
    "triton.backends.nvidia.compiler",
    "triton.backends.nvidia.driver",
)


@dataclass(frozen=True)
class Target:
    """The GPU a variant is compiled for, as Triton names it (``GPUTarget``): backend, architecture (90 for
    sm_90), warp size; and the device index the parent compiles for."""

    backend: str
    arch: int
    warp_size: int
    device: int = 0

    def gpu_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


@dataclass(frozen=True)
class KernelJob:
    """One variant to compile: the JIT function (module and qualified name: a worker imports it), Triton's
    serialized specialization of the variant (JSON) and the target."""

    module: str
    name: str
    specialization: str
    target: Target

    def to_json(self) -> str:
        return json.dumps(
            {
                "module": self.module,
                "name": self.name,
                "spec": self.specialization,
                "target": vars(self.target),
            }
        )

    @classmethod
    def from_json(cls, line: str) -> KernelJob:
        d = json.loads(line)
        return cls(d["module"], d["name"], d["spec"], Target(**d["target"]))


@dataclass(frozen=True)
class JobResult:
    """What a worker reported for a job: compiled or not, whether the C launcher was built too, the error,
    and the seconds the compile and the launcher took there."""

    job: KernelJob
    ok: bool
    launcher: bool = False
    error: str = ""
    compile_s: float = 0.0
    launcher_s: float = 0.0
    torch_loaded: bool = False  # the worker had imported torch by then (it should not: start-up cost)


class CompileOnlyDriver:
    """Answers what Triton's compiler asks its driver (current device, stream, target) for a fixed target,
    so a process compiles for a GPU it never opens (or that it does not have)."""

    def __init__(self, target: Target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return self.target.device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0  # never launched on: compile-only

    def get_current_target(self) -> Any:
        return self.target.gpu_target()

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return divmod(self.target.arch, 10)


@contextlib.contextmanager
def compile_only_driver(target: Target) -> Iterator[CompileOnlyDriver]:
    """Make a :class:`CompileOnlyDriver` Triton's active driver meanwhile; the previous one (or none yet)
    afterwards."""
    from triton.runtime.driver import driver

    stand_in = CompileOnlyDriver(target)
    previous = driver._active  # read without creating one (that needs a GPU)
    driver.set_active(stand_in)  # type: ignore[arg-type]
    try:
        yield stand_in
    finally:
        driver._active = previous


def jit_function(kernel: Any) -> tuple[str, str] | None:
    """(module, qualified name) of a Triton JIT function a worker can import and ``preload``; None for
    anything else (stand-ins, interpreted kernels, functions defined inside functions)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    if not isinstance(kernel, JITFunction) or not hasattr(kernel, "preload"):
        return None
    fn = kernel.fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<locals>" in name:
        return None
    return module, name


class _SpecializationHook:
    """Triton's ``jit_cache_hook`` while :func:`specialization_of` asks: in the asking thread it keeps the
    variant's specialization and skips the compile; in any other thread it is not there (the hook installed
    before answers, or none: that thread compiles as usual)."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.owner = threading.get_ident()
        self.seen: list[str] = []

    def __call__(self, **info: Any) -> Any:
        if threading.get_ident() != self.owner:
            return self.previous(**info) if self.previous is not None else None
        self.seen.append(info["compile"]["specialization_data"])
        return True  # skip the compile


#: Triton's hook is one process-wide setting: one asker at a time installs and restores it (without this, two
#: interleaved askers could restore each other's hook and leave one installed for good)
_HOOK_LOCK = threading.Lock()


def specialization_of(
    kernel: Any, args: tuple[Any, ...], grid: tuple[int, ...], kwargs: dict[str, Any]
) -> str | None:
    """Triton's serialized specialization of ``kernel`` launched with these arguments, without compiling
    it; None when this process has compiled that variant already (Triton then does not ask) or the kernel is
    not a JIT function. Other threads compile as usual meanwhile (:class:`_SpecializationHook`)."""
    if jit_function(kernel) is None:
        return None
    from triton import knobs

    with _HOOK_LOCK:
        hook = _SpecializationHook(knobs.runtime.jit_cache_hook)
        knobs.runtime.jit_cache_hook = hook
        try:
            kernel.warmup(*args, grid=grid, **kwargs)
        finally:
            knobs.runtime.jit_cache_hook = hook.previous
    return hook.seen[0] if hook.seen else None


def current_target(device: int) -> Target:
    """The target Triton compiles for on CUDA device ``device`` in this process."""
    from triton.runtime.driver import driver

    t = driver.active.get_current_target()
    return Target(str(t.backend), int(t.arch), int(t.warp_size), device)


def triton_install_key() -> tuple[str, str]:
    """This process's Triton: the file of its package and the key Triton's on-disk cache prefixes every
    entry with (``triton.runtime.cache.triton_key``: a hash of Triton's sources and of its 0.5 GB compiler
    library -- about 1 s the first time in a process, then cached). Call it once before compiling on many
    threads: each thread that finds the key missing hashes the library again."""
    import triton
    from triton.runtime import cache

    return str(Path(triton.__file__).resolve()), str(cache.triton_key())


#: environment variables a worker reads the parent's Triton key from (see :func:`adopt_triton_key`)
TRITON_FILE_ENV, TRITON_KEY_ENV = "LDM_SDK_TRITON_FILE", "LDM_SDK_TRITON_KEY"


def adopt_triton_key(environ: dict[str, str] | None = None) -> bool:
    """In a worker: take the parent's Triton key (:func:`triton_install_key`, passed in the environment)
    instead of hashing the installation again, when the worker runs the very same Triton package (same
    file); returns whether it did. The key only names cache entries, so with the same installation it is
    the same string either way."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    file, key = environ.get(TRITON_FILE_ENV), environ.get(TRITON_KEY_ENV)
    if not file or not key:
        return False
    import triton
    from triton.runtime import cache

    if str(Path(triton.__file__).resolve()) != file:
        return False
    cache.triton_key = lambda: key  # this process only: the worker's own cache lookups
    return True


#: the folder, inside Triton's on-disk cache, of the marks left for variants workers compiled into it
MARKS_FOLDER = "ldm_sdk_compiled"


def compiled_mark(job: KernelJob, triton_key: str) -> Path | None:
    """The file whose existence says a worker compiled ``job`` into this process's Triton cache (so a later
    process need not start workers to find it there): inside that cache, so clearing the cache clears the
    marks, named by a hash of Triton's installation key (:func:`triton_install_key`), the kernel's source
    key (``JITFunction.cache_key``: its source and what it calls) and the job. None where the cache folder or
    the kernel cannot be found."""
    try:
        source_key = str(getattr(importlib.import_module(job.module), job.name).cache_key)
        folder = _cache_folder()
    except Exception:  # an unimportable kernel, a Triton without these: no mark, the job is sent
        return None
    if folder is None:
        return None
    digest = hashlib.sha256("\n".join((triton_key, source_key, job.to_json())).encode()).hexdigest()
    return folder / MARKS_FOLDER / digest


def leave_mark(mark: Path | None) -> None:
    """Create ``mark`` (:func:`compiled_mark`); a cache folder that cannot be written leaves none."""
    if mark is None:
        return
    with contextlib.suppress(OSError):
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()


def _cache_folder() -> Path | None:
    """Triton's on-disk cache folder as this process sees it (``TRITON_CACHE_DIR`` or Triton's default)."""
    try:
        from triton import knobs

        folder = knobs.cache.dir
    except (ImportError, AttributeError):  # Triton before its knobs
        folder = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(folder) if folder else None


# -- the worker side -----------------------------------------------------------------------------------------
def compile_job(job: KernelJob) -> JobResult:
    """Compile ``job`` here (Triton's on-disk cache keeps the binary) and build its C launcher (cached there
    too); the GPU is not used."""
    if job.target.backend != "cuda":
        return JobResult(
            job, False, error=f"only CUDA targets are compiled in workers, got {job.target.backend!r}"
        )
    start = time.perf_counter()
    try:
        kernel = getattr(importlib.import_module(job.module), job.name)
        cached = getattr(kernel, "device_caches", {}).get(job.target.device)
        if cached is not None and cached[2] != job.target.gpu_target():
            del kernel.device_caches[job.target.device]  # made for another job's target
        with compile_only_driver(job.target):
            compiled = kernel.preload(job.specialization)
    except Exception:
        return JobResult(job, False, error=traceback.format_exc(limit=8))
    compiled_at = time.perf_counter()
    try:  # still under the stand-in: the real driver's start-up would probe the GPU (and import torch)
        from triton.backends.nvidia.driver import CudaLauncher

        with compile_only_driver(job.target):
            CudaLauncher(compiled.src, compiled.metadata)  # Triton <= 3.6: compiles the launcher's C source
        launcher = True
    except Exception:  # no per-variant launcher to build here (newer Triton) or nothing to link it against
        launcher = False
    return JobResult(
        job, True, launcher, compile_s=compiled_at - start, launcher_s=time.perf_counter() - compiled_at
    )


def worker_main() -> None:
    """A worker's loop: warm imports, then one job per stdin line, one reply per line, until EOF. Replies go
    to the stdout the worker was started with; anything else written to stdout (by Python or by native
    code) goes to stderr instead, so it cannot garble them."""
    if "--nice" in sys.argv:  # a background compilation: leave the cores to the caller's own work first
        increment = int(sys.argv[sys.argv.index("--nice") + 1])
        if increment and hasattr(os, "nice"):
            os.nice(increment)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for module in WARM_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with contextlib.suppress(ImportError):
        adopt_triton_key()
    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        result = compile_job(KernelJob.from_json(line))
        reply = {
            "ok": result.ok,
            "launcher": result.launcher,
            "error": result.error,
            "compile_s": result.compile_s,
            "launcher_s": result.launcher_s,
            "torch": "torch" in sys.modules,  # diagnostics: a worker must stay torch-free
        }
        print(json.dumps(reply), file=replies, flush=True)


# -- the parent side -----------------------------------------------------------------------------------------
def python_executable() -> str | None:
    """The interpreter to start workers with: ``sys.executable`` when it is a Python interpreter (inside an
    embedding application it may be the application itself); else None."""
    exe = sys.executable
    if not exe or not Path(exe).name.lower().startswith("python"):
        return None
    return exe


class CompileWorkers:
    """``processes`` worker processes compiling :class:`KernelJob` s (see the module doc). Start them with
    the constructor, :meth:`submit` jobs, collect :meth:`results` (in completion order), :meth:`close` (or
    use as a context manager). ``python``: the interpreter (default :func:`python_executable`); ``nice``:
    how much the workers lower their scheduling priority (``os.nice``; their compilers inherit it);
    ``triton_key``: this process's :func:`triton_install_key`, which workers running the same Triton take
    instead of computing it (:func:`adopt_triton_key`)."""

    def __init__(
        self,
        processes: int,
        *,
        python: str | None = None,
        nice: int = 0,
        triton_key: tuple[str, str] | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if nice < 0:
            raise ValueError(f"nice must be >= 0 (workers may only lower their priority), got {nice}")
        exe = python or python_executable()
        if exe is None:
            raise RuntimeError(
                f"no Python interpreter to start compile workers with (sys.executable={sys.executable!r})"
            )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        env.pop("TRITON_INTERPRET", None)  # workers compile real kernels
        if triton_key is not None:  # spares each worker ~1 s of hashing Triton's installation
            env[TRITON_FILE_ENV], env[TRITON_KEY_ENV] = triton_key
        self._jobs: queue.Queue[KernelJob | None] = queue.Queue()
        self._results: queue.Queue[JobResult] = queue.Queue()
        self._submitted = 0
        self._collected = 0
        self._logs: list[Any] = []
        self._procs: list[subprocess.Popen[str]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._last_error = ""
        try:
            for _ in range(processes):
                log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed in close()
                proc = subprocess.Popen(
                    [exe, "-m", "ldm_sdk.kernels.compile_workers", "--nice", str(nice)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    text=True,
                    bufsize=1,
                )
                self._logs.append(log)
                self._procs.append(proc)
        except OSError:
            self.close()
            raise
        self._alive = len(self._procs)
        for i, proc in enumerate(self._procs):
            thread = threading.Thread(
                target=self._feed, args=(proc, i), name=f"ldm-sdk-compile-worker-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    @property
    def processes(self) -> int:
        return len(self._procs)

    def submit(self, job: KernelJob) -> None:
        """Queue ``job``; it fails at once (as a result) when no worker is alive."""
        with self._lock:
            self._submitted += 1
            if self._alive:
                self._jobs.put(job)
            else:
                self._results.put(
                    JobResult(job, False, error=f"no compile worker alive:\n{self._last_error}")
                )

    def results(self) -> Iterator[JobResult]:
        """The results of the jobs submitted so far, as they finish."""
        while self._collected < self._submitted:
            result = self._results.get()
            self._collected += 1
            yield result

    def close(self) -> None:
        """End the workers (their current job first; a worker still busy after 30 s is killed, its job
        failed); idempotent."""
        for _ in self._procs:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        for proc in self._procs:
            with contextlib.suppress(OSError):
                if proc.stdin:
                    proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=10)  # a killed worker's thread returns from its read now
        for log in self._logs:
            log.close()
        self._procs, self._threads, self._logs = [], [], []

    def __enter__(self) -> CompileWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log_tail(self, i: int) -> str:
        """The end of worker ``i``'s stderr ("" once closed)."""
        try:
            log = self._logs[i]
            log.flush()
            log.seek(0)
            return str(log.read()[-2000:])
        except (IndexError, ValueError, OSError):
            return ""

    def _feed(self, proc: subprocess.Popen[str], i: int) -> None:
        """One worker's jobs, one at a time. When the worker dies, its job in hand fails (the caller compiles
        it itself) and the others go to the workers left; with none left, every queued job fails."""
        assert proc.stdin is not None and proc.stdout is not None
        job: KernelJob | None = None
        why = "exited"
        first = proc.stdout.readline()
        if _reply(first).get("ready") is True:
            while (job := self._jobs.get()) is not None:
                try:
                    proc.stdin.write(job.to_json() + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except OSError:
                    line = ""
                if not line:
                    break
                d = _reply(line)
                if "ok" not in d:  # the protocol broke: this worker is done
                    why = f"answered {line.strip()[:200]!r}"
                    proc.kill()
                    break
                self._results.put(
                    JobResult(
                        job,
                        bool(d["ok"]),
                        bool(d.get("launcher")),
                        str(d.get("error", "")),
                        float(d.get("compile_s", 0.0)),
                        float(d.get("launcher_s", 0.0)),
                        bool(d.get("torch")),
                    )
                )
            else:
                return  # closed
        elif first:
            why = f"started with {first.strip()[:200]!r} instead of a ready line"
            proc.kill()
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        error = f"compile worker {i} {why} (exit code {code}):\n{self._log_tail(i)}"
        with self._lock:
            self._alive -= 1
            self._last_error = error
            if job is not None:
                self._results.put(JobResult(job, False, error=error))
            if not self._alive:
                while True:
                    try:
                        left = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if left is not None:
                        self._results.put(JobResult(left, False, error=error))


def _reply(line: str) -> dict[str, Any]:
    """A worker's JSON line as a dict; {} for anything else."""
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


if __name__ == "__main__":
    worker_main()
