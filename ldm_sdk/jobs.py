"""The runtime's job queue: one worker thread runs jobs one at a time, highest priority first.

``JobQueue.submit(fn, priority=..., name=...)`` returns a :class:`Job` at once; the worker calls
``fn(JobContext)``. Jobs of equal priority run in submission order. Cancelling a queued job means it never
starts; a running job stops at its next step check (``JobContext.check_cancelled()`` or the sampler callback
from ``JobContext.step_callback()``), i.e. within one sampler step. Every state change is delivered as a typed
event to the ``emit`` function the queue was built with (the runtime forwards them to its subscribers and to
the ``ldm_job_event`` hook); for any one job, events arrive in order.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ldm_sdk.samplers.base import SamplingCancelled, StepCallback, StepInfo

logger = logging.getLogger("ldm_sdk.jobs")
R = TypeVar("R")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


class JobCancelledError(SamplingCancelled):
    """The job was cancelled: raised by ``JobContext.check_cancelled()`` and by ``Job.result()``."""


# -- events ------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """Base of every job event: which job (``job_id`` is unique per runtime) and when (``time.monotonic``)."""

    job_id: int
    name: str
    time: float


@dataclass(frozen=True, kw_only=True)
class JobQueued(JobEvent):
    priority: int


@dataclass(frozen=True, kw_only=True)
class JobStarted(JobEvent):
    pass


@dataclass(frozen=True, kw_only=True)
class JobProgress(JobEvent):
    """``step`` of ``total`` steps done (1-based: the last event of a 20-step run has ``step=20``)."""

    step: int
    total: int
    preview: Any = None


@dataclass(frozen=True, kw_only=True)
class JobFinished(JobEvent):
    result: Any


@dataclass(frozen=True, kw_only=True)
class JobCancelled(JobEvent):
    """``started`` says whether the job had begun running (False: it was cancelled while queued)."""

    started: bool


@dataclass(frozen=True, kw_only=True)
class JobFailed(JobEvent):
    error: BaseException


# -- jobs --------------------------------------------------------------------------------------------


class Job(Generic[R]):
    """A submitted unit of work. Thread-safe; created by :meth:`JobQueue.submit`."""

    def __init__(self, queue: JobQueue, job_id: int, name: str, priority: int, fn: Callable[..., R]) -> None:
        self.id = job_id
        self.name = name
        self.priority = priority
        self._queue = queue
        self._fn = fn
        self._status = JobStatus.QUEUED
        self._cancel_requested = False
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def status(self) -> JobStatus:
        return self._status

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished, failed or been cancelled; False if ``timeout`` ran out first."""
        return self._done.wait(timeout)

    def cancel(self) -> bool:
        """Ask the job to stop. A queued job never starts; a running one stops at its next step check.
        Returns False if the job had already ended."""
        return self._queue._cancel(self)

    def result(self, timeout: float | None = None) -> R:
        """The job's return value. Raises ``TimeoutError`` if not done within ``timeout`` seconds,
        :class:`JobCancelledError` if it was cancelled, or the job's own exception if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} ({self.name!r}) is still {self._status} after {timeout} s")
        if self._status == JobStatus.CANCELLED:
            raise JobCancelledError(f"job {self.id} ({self.name!r}) was cancelled")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, priority={self.priority}, status={self._status})"


class JobContext:
    """What a job function receives: progress reporting and cancellation checks for the running job."""

    def __init__(self, job: Job[Any], emit: Callable[[JobEvent], None], runtime: Any = None) -> None:
        self.job = job
        self.runtime = runtime  # the owning Runtime (None for a bare JobQueue)
        self._emit = emit

    @property
    def cancelled(self) -> bool:
        return self.job.cancel_requested

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelledError` if the job was cancelled; call it between units of work."""
        if self.job.cancel_requested:
            raise JobCancelledError(f"job {self.job.id} ({self.job.name!r}) was cancelled")

    def progress(self, step: int, total: int, preview: Any = None) -> None:
        """Report ``step`` of ``total`` done (emits :class:`JobProgress`); does not check cancellation."""
        self._emit(
            JobProgress(
                job_id=self.job.id,
                name=self.job.name,
                time=time.monotonic(),
                step=step,
                total=total,
                preview=preview,
            )
        )

    def step_callback(
        self, *, preview_every: int = 0, family: str | None = None, then: StepCallback | None = None
    ) -> StepCallback:
        """A sampler ``callback``: reports progress after each step (with a latent preview of the ``x0``
        estimate every ``preview_every`` steps, 0 for none), calls ``then(info)`` if given, and raises
        :class:`JobCancelledError` (a ``SamplingCancelled``) once the job is cancelled, so the sampler
        stops before its next model call."""

        def callback(info: StepInfo) -> None:
            preview = None
            if preview_every > 0 and ((info.step + 1) % preview_every == 0 or info.step + 1 == info.total):
                from ldm_sdk.preview import preview_image

                preview = preview_image(info.x0, family=family)
            self.progress(info.step + 1, info.total, preview)
            if then is not None:
                then(info)
            self.check_cancelled()

        return callback


# -- the queue ---------------------------------------------------------------------------------------


class JobQueue:
    """Priority queue + one worker thread (started on the first submit, stopped by :meth:`close`)."""

    def __init__(
        self, emit: Callable[[JobEvent], None], *, runtime: Any = None, name: str = "ldm-sdk"
    ) -> None:
        self._emit_fn = emit
        self._runtime = runtime
        self._thread_name = f"{name}-jobs"
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Job[Any]]] = []
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._running: Job[Any] | None = None
        self._closed = False

    def submit(self, fn: Callable[[JobContext], R], *, priority: int = 0, name: str | None = None) -> Job[R]:
        """Queue ``fn(ctx)``; higher ``priority`` runs first, FIFO within a priority. Thread-safe."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable taking a JobContext, got {type(fn).__name__}")
        with self._cond:
            if self._closed:
                raise RuntimeError("the runtime is closed: no job can be submitted (create a new Runtime)")
            job_id = next(self._ids)
        job: Job[R] = Job(self, job_id, name or getattr(fn, "__name__", "job"), int(priority), fn)
        # announced before the worker can see it, so JobQueued is always a job's first event
        self._emit(JobQueued(job_id=job.id, name=job.name, time=time.monotonic(), priority=job.priority))
        with self._cond:
            if not self._closed:
                heapq.heappush(self._heap, (-job.priority, job.id, job))
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
                    self._worker.start()
                self._cond.notify()
                return job
        self._cancel(job)  # closed while we announced it
        return job

    def pending(self) -> list[Job[Any]]:
        """Queued jobs in the order they will run."""
        with self._cond:
            return [j for _, _, j in sorted(self._heap) if j.status == JobStatus.QUEUED]

    @property
    def running(self) -> Job[Any] | None:
        return self._running

    def close(self, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Stop accepting jobs; cancel queued ones (or, with ``cancel_pending=False``, let them run), ask
        the running job to stop, and join the worker. Idempotent."""
        with self._cond:
            self._closed = True
            queued = [j for _, _, j in self._heap] if cancel_pending else []
            running = self._running if cancel_pending else None
            worker = self._worker
            self._cond.notify_all()
        for job in queued:
            self._cancel(job)
        if running is not None:
            self._cancel(running)
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            if worker.is_alive():
                raise TimeoutError(f"the job worker did not stop within {timeout} s (a job ignores cancel?)")

    # -- internals -----------------------------------------------------------------------------------
    def _cancel(self, job: Job[Any]) -> bool:
        with self._cond:
            if job._done.is_set():
                return False
            job._cancel_requested = True
            if job._status != JobStatus.QUEUED:
                return True  # running: the worker reports JobCancelled when the job stops
            job._status = JobStatus.CANCELLED
            job._done.set()
        self._emit(JobCancelled(job_id=job.id, name=job.name, time=time.monotonic(), started=False))
        return True

    def _next(self) -> Job[Any] | None:
        with self._cond:
            while True:
                while self._heap:
                    _, _, job = heapq.heappop(self._heap)
                    if job._status == JobStatus.QUEUED:
                        job._status = JobStatus.RUNNING
                        self._running = job
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            self._emit(JobStarted(job_id=job.id, name=job.name, time=time.monotonic()))
            result: Any = None
            error: BaseException | None = None
            try:
                result = job._fn(JobContext(job, self._emit, self._runtime))
            except SamplingCancelled:
                status = JobStatus.CANCELLED
            except BaseException as exc:
                status, error = JobStatus.FAILED, exc
            else:
                status = JobStatus.FINISHED
            with self._cond:
                job._status, job._result, job._error = status, result, error
                self._running = None
                job._done.set()
            stamp = time.monotonic()
            if status == JobStatus.FINISHED:
                self._emit(JobFinished(job_id=job.id, name=job.name, time=stamp, result=result))
            elif status == JobStatus.CANCELLED:
                self._emit(JobCancelled(job_id=job.id, name=job.name, time=stamp, started=True))
            else:
                assert error is not None
                self._emit(JobFailed(job_id=job.id, name=job.name, time=stamp, error=error))
            del job, result, error

    def _emit(self, event: JobEvent) -> None:
        try:
            self._emit_fn(event)
        except Exception:
            logger.exception("delivering %s failed; the job goes on", type(event).__name__)
