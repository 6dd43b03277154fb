"""Compile a later call's fused kernels in the background, in worker processes, while the caller works on.

Why: the first image pays two pre-compilations one after the other (:mod:`ldm_sdk.accel.precompile`): the
UNet's, at its first step, and the decoder's, at the first decode (53 and 22 variants for SD-1.5 at 512 px,
4.3-4.8 s and 2.0-2.6 s on an H100 machine, ``bench/cold_start.py``). Between them the main thread warms
up and captures the UNet's graph and runs the 50 steps -- Python and GPU work that leaves the other cores
idle. Compiled on threads of the same process, the decoder's kernels slowed that main-thread work through
the GIL as much as they hid (session 8, ``bench/results/cold_start_ahead*_h100.json``); compiled in worker
processes they do not touch the caller's interpreter at all.

How: :func:`compile_ahead` records the call's Triton launches now
(:func:`~ldm_sdk.accel.precompile.record_launches`: the call runs once with its kernels skipped), asks
Triton for each new variant's specialization and hands them to
:class:`~ldm_sdk.kernels.compile_workers.CompileWorkers` started with a lowered scheduling priority
(``os.nice``), so whatever the caller compiles or runs itself keeps the cores first. It returns at once
with a :class:`PendingCompile`; a daemon thread starts the workers, collects the results and ends them.
The binaries land in Triton's on-disk cache, so the later pre-compilation of the same call (which should
:meth:`~PendingCompile.wait` first) only loads them; each variant a worker compiled is also marked in that
cache (:func:`~ldm_sdk.kernels.compile_workers.compiled_mark`), so a later process with the same cache
starts no workers for it (with a warm cache, none at all: starting them and loading Triton there took
longer than the sampler, and the first decode waited for them).
:meth:`ldm_sdk.accel.graphs.CapturedModel.compile_ahead` does this for a call shape it will capture; the
task runner starts the decoder's before sampling.

Limits: only where :func:`~ldm_sdk.accel.precompile.default_processes` finds CUDA, real Triton kernels and
a Python interpreter to start workers with; otherwise nothing is started (None) and the later
pre-compilation compiles as before. The recording call must not overlap another call of the same model
(see :mod:`ldm_sdk.accel.precompile`; the runtime runs one job at a time). Triton's ``jit_cache_hook``, set
while the specializations are taken, acts only in the asking thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ldm_sdk.accel.precompile import (
    default_processes,
    record_launches,
    recording_modules,
    worker_job,
    worker_target,
)

if TYPE_CHECKING:
    from ldm_sdk.kernels.compile_workers import CompileWorkers, KernelJob

#: how much the workers lower their priority: the caller's own compile threads and main thread come first
AHEAD_NICE = 10
#: how long a capture waits for a background compilation before compiling what is missing itself
AHEAD_WAIT_S = 300.0


@dataclass(frozen=True)
class AheadReport:
    """What a background compilation did: launches recorded, variants sent to workers (those not compiled
    in this process already nor marked as compiled into Triton's cache by earlier workers: ``cached``),
    compiled there, failed there (the later pre-compilation compiles those itself), worker processes;
    seconds of the recording call (on the caller's thread), of taking the specializations and of starting
    the workers (on the background thread) and from the start to the last result; and of computing
    Triton's installation key there (``triton_install_key``, which primes this process's compile threads
    too)."""

    launches: int
    sent: int
    compiled: int
    failed: int
    processes: int
    record_s: float
    wall_s: float
    spec_s: float = 0.0
    start_s: float = 0.0
    key_s: float = 0.0
    cached: int = 0

    def __str__(self) -> str:
        return (
            f"compiled {self.compiled} of {self.sent} kernel variants ahead in {self.processes} worker "
            f"processes in {self.wall_s:.2f} s ({self.failed} failed, {self.cached} compiled into the cache "
            f"by earlier workers; recording call {self.record_s:.2f} s, specializations {self.spec_s:.2f} s, "
            f"starting the workers {self.start_s:.2f} s)"
        )


class PendingCompile:
    """Variants compiling in worker processes in the background (made by :func:`compile_ahead`). A daemon
    thread computes Triton's installation key (:func:`~ldm_sdk.kernels.compile_workers.triton_install_key`),
    takes the jobs (``make_jobs()``: Triton's specializations, the caller's thread spared them), starts
    ``make_workers(n, key)`` with ``n`` = ``processes`` or fewer (one per job at most; starting 16
    processes from a large one takes a while), submits the jobs, collects the results and ends the workers.
    ``launches``, ``record_s``, ``started`` (a ``time.perf_counter`` stamp): for the report."""

    def __init__(
        self,
        make_jobs: Callable[[], Sequence[KernelJob]],
        make_workers: Callable[[int, tuple[str, str]], CompileWorkers],
        processes: int,
        *,
        launches: int = 0,
        record_s: float = 0.0,
        started: float | None = None,
    ) -> None:
        self._make_jobs, self._make_workers, self._wanted = make_jobs, make_workers, processes
        self._launches, self._record_s = launches, record_s
        self._started = time.perf_counter() if started is None else started
        self._sent = self._compiled = self._failed = self._processes = self._cached = 0
        self._wall_s = self._spec_s = self._start_s = self._key_s = 0.0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="ldm-sdk-compile-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._compile()
        except Exception as exc:  # the later pre-compilation compiles whatever is missing
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._wall_s = time.perf_counter() - self._started

    def _compile(self) -> None:
        from ldm_sdk.kernels.compile_workers import compiled_mark, leave_mark, triton_install_key

        start = time.perf_counter()
        # first: the caller's own compile threads need this key soon (about 1 s to compute the first time),
        # and the workers take it instead of computing it each
        key = triton_install_key()
        self._key_s = time.perf_counter() - start
        start = time.perf_counter()
        jobs = list(dict.fromkeys(self._make_jobs()))
        self._make_jobs = lambda: ()  # drop what it holds
        # what earlier workers compiled into this cache is only loaded later: no workers started for it
        marks = {job: compiled_mark(job, key[1]) for job in jobs}
        jobs = [job for job in jobs if (mark := marks[job]) is None or not mark.exists()]
        self._cached = len(marks) - len(jobs)
        self._sent = len(jobs)
        self._spec_s = time.perf_counter() - start
        if not jobs:
            return
        start = time.perf_counter()
        try:
            workers = self._make_workers(min(self._wanted, len(jobs)), key)
        except (OSError, RuntimeError) as exc:  # no workers: the later pre-compilation compiles them all
            self._failed = len(jobs)
            self.errors.append(f"compile workers did not start: {exc}")
            return
        self._start_s = time.perf_counter() - start
        self._processes = workers.processes
        try:
            for job in jobs:
                workers.submit(job)
            for result in workers.results():
                if result.ok:
                    self._compiled += 1
                    leave_mark(marks.get(result.job))
                else:
                    self._failed += 1
                    self.errors.append(result.error)
        finally:
            workers.close()

    def done(self) -> bool:
        """Whether every variant has come back (compiled or failed) and the workers have ended."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> AheadReport:
        """Block until :meth:`done` (or ``timeout`` seconds: then ``TimeoutError``); the report."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the background compilation of kernel variants is still running")
        return AheadReport(
            self._launches,
            self._sent,
            self._compiled,
            self._failed,
            self._processes,
            self._record_s,
            self._wall_s,
            self._spec_s,
            self._start_s,
            self._key_s,
            self._cached,
        )


def compile_ahead(
    modules: Sequence[object],
    call: Callable[[], object],
    *,
    processes: int | None = None,
    nice: int | None = None,
) -> PendingCompile | None:
    """Record the Triton launches ``call()`` makes through the fused modules of ``modules`` and start
    compiling their variants in ``processes`` worker processes (default
    :func:`~ldm_sdk.accel.precompile.default_processes`; at most one per variant) at priority ``nice``
    (default :data:`AHEAD_NICE`, read at the call);
    returns once the call is recorded (the specializations are taken on the background thread, from
    stand-ins that keep no tensor memory). None when nothing was started: no fused modules, no workers to
    be had, no launch a worker could take. Variants this process has compiled already are not sent (the
    report's ``sent`` may be 0), nor those earlier workers marked as compiled into this Triton cache (its
    ``cached``: with a warm cache no worker starts). See the module doc."""
    if processes is not None and processes < 0:
        raise ValueError(f"processes must be >= 0, got {processes}")
    wanted = default_processes() if processes is None else processes
    if wanted < 1 or not recording_modules(modules):
        return None
    from ldm_sdk.kernels.compile_workers import CompileWorkers

    started = time.perf_counter()
    unique, launches, record_s = record_launches(modules, call)
    # what a worker cannot take, the later pre-compilation compiles; the others (recorded as stand-ins: only
    # what Triton specialises on, no tensor memory) go to the background thread
    sendable = [(launch, *where) for launch in unique if (where := worker_target(launch))]
    del unique
    if not sendable:
        return None

    def make_jobs() -> list[KernelJob]:
        return [job for launch, device, name in sendable if (job := worker_job(launch, device, name))]

    return PendingCompile(
        make_jobs,
        lambda n, key: CompileWorkers(n, nice=AHEAD_NICE if nice is None else nice, triton_key=key),
        wanted,
        launches=launches,
        record_s=record_s,
        started=started,
    )


__all__ = ["AHEAD_NICE", "AHEAD_WAIT_S", "AheadReport", "PendingCompile", "compile_ahead"]
