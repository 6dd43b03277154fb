"""Background compilation in worker processes (``ldm_sdk.accel.compile_ahead``), on the CPU.

What is checked, and against what:

- :func:`compile_ahead` starts nothing (returns None) with ``processes=0`` (the recording call is not even
  made), for models without fused modules (call not made), for launches that are not CUDA launches of an
  importable JIT kernel (the call is made, no worker is started); when every variant is compiled in this
  process already it sends nothing and starts no worker (known only on its background thread: the report
  says ``sent == 0``); negative ``processes`` raise ``ValueError`` naming the value. The stand-ins the
  background thread takes the specializations from (no tensor memory kept) give Triton's specialization of
  the real arguments: aligned and misaligned tensors, a TMA descriptor.
- The end-to-end flow against Triton itself, with real worker processes compiling the real row-softmax
  kernel (``ldm_sdk.kernels.row_softmax._softmax_rows_kernel``) for sm_90 into this test's own Triton cache
  (``TRITON_CACHE_DIR``, set before the workers start). The recorded call makes three launches, one a
  duplicate, of two variants (two ``BLOCK`` sizes): the report must say 3 launches, 2 sent, 2 compiled, 0
  failed, 2 processes; ``compile_ahead`` must return before the workers are done, this process must not
  compile anything itself (Triton's front end, ``ASTSource.make_ir``, is patched to raise here -- workers
  are separate processes and are not affected), two ``.cubin`` files must land in the cache, and the
  workers must be started with ``nice=AHEAD_NICE`` (a separate test reads a live worker's priority: lowered
  by the ``nice`` given). A second ``compile_ahead`` sends the same 2 variants
  again (the disk cache does not count: only variants this process has compiled are skipped) and starts at
  most one process per variant; after this process compiled one variant itself (a cache hit, which the
  patched front end proves), only the other is sent; after both, nothing is started.
- ``PendingCompile.wait(timeout=...)`` raises ``TimeoutError`` while a worker is still busy (a worker that
  never answers: ``CompileWorkers`` started with a ``python`` that is a shell script exec'ing ``sleep``);
  once that worker is killed the job is reported failed with the worker's exit, not raised.
- A job the worker cannot import (``jit_function`` patched to name a kernel that does not exist) is
  reported: failed == 1, compiled == 0, ``errors`` holding the worker's ``AttributeError``.
- :meth:`CapturedModel.compile_ahead`: False (``fn`` not run) in modes "emulate" and "off" and in "auto"
  off CUDA; ``CaptureError`` in "graph" mode off CUDA, like a call. Its wiring, CUDA-free (``_active``
  patched to True, ``compile_ahead`` patched to a fake): started once per signature, not again while
  pending, again for another shape, not when the fake starts nothing; and a capture of a pending signature
  waits for it and counts its variants in ``stats.compiled_ahead`` (``_capture_graph`` patched to a fake
  graph: no graph is captured on the CPU).
- The task runner: ``Run.compile_decoder_ahead`` is False on the CPU without asking the decoder (spy), and
  without the fast path; its CUDA branch (the runner's ``torch.zeros`` patched to make the latent on the CPU)
  asks the captured decoder for one latent of the size, in the run's dtype, under inference mode; and
  ``sample_latents`` calls it with the latent shape before sampling (a tiny txt2img run).

Monkeypatches that make the CPU tensors of the end-to-end flow count as CUDA launches (fixture ``as_cuda``):
``ldm_sdk.accel.precompile._device`` maps a launch's CPU device to ``cuda:0``; ``torch.cuda.device`` is
a recording no-op context; ``ldm_sdk.kernels.compile_workers.current_target`` answers sm_90 (the real one asks
Triton's driver, which needs a GPU); ``ldm_sdk.kernels.compile_workers.specialization_of`` runs the real one
under :func:`compile_only_driver` (Triton asks its driver for the device and target). ``compile_ahead``
imports the last two inside the function from their module, so the module attributes are patched.
Triton keeps the variants compiled in this process in the kernel's ``device_caches``; the ``kernel``
fixture gives each test an empty one (restored afterwards), as ``tests/kernels/test_compile_workers.py``
does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from triton.compiler.compiler import ASTSource

import ldm_sdk.accel.compile_ahead as ahead_module
import ldm_sdk.kernels.compile_workers as workers_module
from ldm_sdk.accel import precompile
from ldm_sdk.accel.compile_ahead import AHEAD_NICE, AheadReport, PendingCompile, compile_ahead
from ldm_sdk.accel.graphs import CapturedModel, CaptureError
from ldm_sdk.accel.triton_kernels import KernelRecorder, launch
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.kernels.compile_workers import (
    MARKS_FOLDER,
    CompileWorkers,
    KernelJob,
    Target,
    compile_only_driver,
    triton_install_key,
)
from ldm_sdk.kernels.row_softmax import _softmax_rows_kernel

TARGET = Target("cuda", 90, 32, 0)
WAIT = 120.0  # seconds any wait may take before the test fails instead of hanging


# -- stand-ins and helpers -----------------------------------------------------------------------------------
class Softmaxes(nn.Module):
    """A fused module: launches the real row-softmax kernel over ``x`` in place (recorded only, while
    ``kernel_recorder`` is set, as in the fused modules)."""

    kernel_recorder: KernelRecorder | None = None

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.seen: list[KernelRecorder | None] = []

    def forward(self, x: Tensor, block: int) -> Tensor:
        self.calls += 1
        self.seen.append(self.kernel_recorder)
        rows, cols = x.shape
        launch(_softmax_rows_kernel, (rows,), self.kernel_recorder, x, cols, BLOCK=block, num_warps=4)
        return x


def three_launches(module: Softmaxes, x: Tensor) -> Callable[[], object]:
    """Two variants (BLOCK 64 and 128) and a duplicate of the first."""
    return lambda: (module(x, 64), module(x, 128), module(x, 64))


def rows() -> Tensor:
    return torch.zeros(4, 64, dtype=torch.float16)


def in_process_warmup(x: Tensor, block: int) -> Any:
    """This process compiles (or loads from the disk cache) one variant, as the later pre-compilation
    would."""
    with compile_only_driver(TARGET):
        return _softmax_rows_kernel.warmup(x, x.shape[1], grid=(x.shape[0],), BLOCK=block, num_warps=4)


def refuse_compile(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("compiled in this process")


def within(fn: Callable[[], Any], timeout: float = WAIT) -> Any:
    """``fn()`` on a thread; the test fails when it has not returned in ``timeout`` seconds."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if errors:
        raise errors[0]
    return out[0]


def wait_report(pending: PendingCompile | None) -> AheadReport:
    """The report, waiting at most ``WAIT`` seconds (``wait``'s own time-out, guarded by a thread's)."""
    assert isinstance(pending, PendingCompile)
    return within(lambda: pending.wait(timeout=WAIT), WAIT + 30)


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real row-softmax kernel with an empty in-process cache (the original is restored afterwards)."""
    monkeypatch.setattr(
        _softmax_rows_kernel, "device_caches", defaultdict(_softmax_rows_kernel.create_binder)
    )
    return _softmax_rows_kernel


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, Any]]]:
    """``(processes, keywords)`` of every ``CompileWorkers`` ``compile_ahead`` starts (a subclass spy:
    ``PendingCompile``'s isinstance check still holds)."""
    made: list[tuple[int, dict[str, Any]]] = []

    class SpyWorkers(CompileWorkers):
        def __init__(self, processes: int, **kwargs: Any) -> None:
            made.append((processes, kwargs))
            super().__init__(processes, **kwargs)
            self.pids = [p.pid for p in self._procs]

    monkeypatch.setattr(workers_module, "CompileWorkers", SpyWorkers)
    return made


@pytest.fixture
def as_cuda(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make ``compile_ahead`` take the CPU launches for launches on ``cuda:0`` of an sm_90 GPU (see the
    module doc); returns the devices ``torch.cuda.device`` was entered with."""
    real_device = precompile._device
    real_spec = workers_module.specialization_of
    devices: list[Any] = []

    def device(launch: Any) -> torch.device | None:
        found = real_device(launch)
        return torch.device("cuda", 0) if found is not None else None

    def spec(*args: Any, **kwargs: Any) -> str | None:
        with compile_only_driver(TARGET):
            return real_spec(*args, **kwargs)

    @contextlib.contextmanager
    def current_device(device: Any) -> Iterator[None]:
        devices.append(device)
        yield

    monkeypatch.setattr(precompile, "_device", device)
    monkeypatch.setattr(torch.cuda, "device", current_device)
    monkeypatch.setattr(workers_module, "current_target", lambda index: Target("cuda", 90, 32, index))
    monkeypatch.setattr(workers_module, "specialization_of", spec)
    return devices


# -- nothing started -----------------------------------------------------------------------------------------
def test_no_processes_no_fused_modules_and_bad_processes() -> None:
    called: list[int] = []
    fused = Softmaxes()
    assert compile_ahead([fused], lambda: called.append(1), processes=0) is None
    assert called == [] and fused.calls == 0  # nothing recorded: the call is not made
    assert compile_ahead([nn.Linear(2, 2)], lambda: called.append(1), processes=2) is None
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert compile_ahead([plain], lambda: called.append(1), processes=2) is None
    assert called == []
    with pytest.raises(ValueError, match="processes must be >= 0, got -1"):
        compile_ahead([fused], lambda: called.append(1), processes=-1)
    with pytest.raises(ValueError, match="got -3"):
        compile_ahead([nn.Linear(2, 2)], lambda: None, processes=-3)
    assert called == []


def test_default_processes_without_cuda_start_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default is ``default_processes()``: 0 here (no CUDA), so nothing is recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precompile.default_processes() == 0
    fused = Softmaxes()
    assert compile_ahead([fused], lambda: fused(rows(), 64)) is None
    assert fused.calls == 0


def test_cpu_launches_are_left_to_the_later_precompilation(
    triton_cache: Path, kernel: Any, started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the patches the launches are on the CPU: recorded (the call runs once, recording), but
    nothing is sent and no worker is started."""
    monkeypatch.setattr(torch.cuda, "device", refuse_compile)  # not reached for a CPU launch
    fused, x = Softmaxes(), rows()
    assert compile_ahead([fused], three_launches(fused, x), processes=2) is None
    assert fused.calls == 3 and all(isinstance(r, KernelRecorder) for r in fused.seen)
    assert fused.kernel_recorder is None and "kernel_recorder" not in fused.__dict__
    assert started == []


def test_kernels_a_worker_cannot_import_are_not_sent(
    as_cuda: list[Any], kernel: Any, started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A launch of something that is not an importable JIT function (``jit_function`` None) stays for
    the later pre-compilation."""
    monkeypatch.setattr(workers_module, "jit_function", lambda k: None)
    fused = Softmaxes()
    assert compile_ahead([fused], lambda: fused(rows(), 64), processes=2) is None
    assert fused.calls == 1 and started == [] and as_cuda == []


# -- the real flow -------------------------------------------------------------------------------------------
def test_compiles_the_recorded_variants_in_workers(
    triton_cache: Path, kernel: Any, as_cuda: list[Any], started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ASTSource, "make_ir", refuse_compile)  # this process compiles nothing itself
    fused, x = Softmaxes(), rows()

    pending = compile_ahead([fused], three_launches(fused, x), processes=2)
    assert isinstance(pending, PendingCompile)
    # workers take a python start-up and Triton's import before any result: still running right after
    assert not pending.done(), "compile_ahead must return while the workers compile"
    assert fused.calls == 3 and all(isinstance(r, KernelRecorder) for r in fused.seen)
    assert fused.kernel_recorder is None and "kernel_recorder" not in fused.__dict__

    report = wait_report(pending)
    # specializations and worker start-up on the background thread, for the launches' device
    assert as_cuda and all(d == torch.device("cuda", 0) for d in as_cuda)
    [(processes, options)] = started
    assert processes == 2 and options == {"nice": AHEAD_NICE, "triton_key": triton_install_key()}
    assert pending.errors == []
    assert (report.launches, report.sent, report.compiled, report.failed) == (3, 2, 2, 0)
    assert report.processes == 2
    assert report.processes <= report.sent
    assert report.record_s > 0 and report.wall_s >= report.record_s
    assert "compiled 2 of 2 kernel variants ahead in 2 worker processes" in str(report)
    assert "0 failed" in str(report)
    assert pending.done()
    assert pending.wait(timeout=0) == report  # waiting again gives the same report at once
    cubins = list(triton_cache.rglob("_softmax_rows_kernel.cubin"))
    assert len(cubins) == 2, cubins

    # what the workers compiled into this cache is marked there: a later call (in another process, say)
    # starts no workers for it -- the capture only loads it
    marks = sorted((triton_cache / MARKS_FOLDER).iterdir())
    assert len(marks) == 2, marks
    second = wait_report(compile_ahead([fused], three_launches(fused, x), processes=8))
    assert (second.launches, second.sent, second.cached, second.compiled, second.failed) == (3, 0, 2, 0, 0)
    assert second.processes == 0 and len(started) == 1
    assert "2 compiled into the cache by earlier workers" in str(second)

    # the marks gone (the disk cache alone does not make a variant "compiled in this process"): both are
    # sent again, on at most one process per variant, and marked again
    for mark in marks:
        mark.unlink()
    third = wait_report(compile_ahead([fused], three_launches(fused, x), processes=8))
    assert (third.launches, third.sent, third.cached, third.compiled, third.failed) == (3, 2, 0, 2, 0)
    assert third.processes == 2 and started[-1][0] == 2
    assert sorted((triton_cache / MARKS_FOLDER).iterdir()) == marks

    # this process loads one variant (a cache hit: the front end refuses to compile) -> only the other is
    # left, and it is marked
    compiled = in_process_warmup(x, 64)
    assert compiled.metadata.name == "_softmax_rows_kernel"
    fourth = wait_report(compile_ahead([fused], three_launches(fused, x), processes=2))
    assert (fourth.launches, fourth.sent, fourth.cached, fourth.compiled) == (3, 0, 1, 0)
    assert fourth.processes == 0 and len(started) == 2

    # both variants here: nothing to send, no worker started (the call was still recorded; what is left to
    # send is only known on the background thread)
    in_process_warmup(x, 128)
    calls = fused.calls
    nothing = wait_report(compile_ahead([fused], three_launches(fused, x), processes=2))
    assert (nothing.sent, nothing.cached, nothing.compiled, nothing.failed, nothing.processes) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert fused.calls == calls + 3
    assert len(started) == 2
    assert len(list(triton_cache.rglob("_softmax_rows_kernel.cubin"))) == 2


def test_workers_run_at_lowered_priority(
    triton_cache: Path, kernel: Any, as_cuda: list[Any], started: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers really run niced (``nice=`` is passed on, checked above too): read while they are alive,
    right after the background thread started them (it closes them at the end); a worker lowers its priority
    itself at start-up, so it is polled for a while."""
    if not hasattr(os, "getpriority"):
        pytest.skip("no os.getpriority")
    own = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = min(own + 7, 19)
    niceness: list[int] = []
    original = PendingCompile.__init__

    def spy(self: PendingCompile, jobs: Any, make_workers: Any, *args: Any, **kwargs: Any) -> None:
        def make(processes: int, key: Any) -> Any:  # on the background thread, before any job is submitted
            workers = make_workers(processes, key)
            [pid] = workers.pids
            deadline = time.monotonic() + 20
            while (now := os.getpriority(os.PRIO_PROCESS, pid)) != wanted and time.monotonic() < deadline:
                time.sleep(0.02)
            niceness.append(now)
            return workers

        original(self, jobs, make, *args, **kwargs)

    monkeypatch.setattr(PendingCompile, "__init__", spy)
    fused = Softmaxes()
    report = wait_report(compile_ahead([fused], lambda: fused(rows(), 64), processes=2, nice=7))
    assert (report.sent, report.compiled, report.processes) == (1, 1, 1)
    assert started[-1] == (1, {"nice": 7, "triton_key": triton_install_key()})
    assert niceness == [wanted]


# -- waiting and failures ------------------------------------------------------------------------------------
def test_wait_times_out_while_a_worker_is_busy(triton_cache: Path, tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    if sleep is None:
        pytest.skip("no `sleep` program to stand in for a worker that never answers")
    script = tmp_path / "python-asleep"
    script.write_text(f"#!/bin/sh\nexec {sleep} 60\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    made: list[CompileWorkers] = []

    def make(processes: int, key: Any) -> CompileWorkers:
        made.append(CompileWorkers(processes, python=str(script)))  # never ready, never answers the job
        return made[-1]

    job = KernelJob("ldm_sdk.kernels.row_softmax", "_softmax_rows_kernel", "{}", TARGET)
    pending = PendingCompile(lambda: [job], make, 1)
    try:
        with pytest.raises(TimeoutError, match="kernel variants is still running"):
            within(lambda: pending.wait(timeout=0.3), 20)
        assert not pending.done()
    finally:
        [workers] = made  # started on the background thread
        workers._procs[0].kill()  # the job in hand fails with the worker's exit
    report = wait_report(pending)
    assert pending.done()
    assert (report.sent, report.compiled, report.failed, report.processes) == (1, 0, 1, 1)
    [error] = pending.errors
    assert "compile worker 0 exited" in error
    assert workers._procs == []  # the collecting thread closed the workers


def test_workers_that_cannot_start_fail_every_job_for_the_later_precompilation() -> None:
    def make(processes: int, key: Any) -> CompileWorkers:
        raise RuntimeError("no Python interpreter to start compile workers with")

    name = ("ldm_sdk.kernels.row_softmax", "_softmax_rows_kernel")
    jobs = [KernelJob(*name, str(i), TARGET) for i in range(3)]
    report = wait_report(PendingCompile(lambda: jobs, make, 2))
    assert (report.sent, report.compiled, report.failed, report.processes) == (3, 0, 3, 0)


def test_a_job_that_fails_in_the_worker_is_reported(
    triton_cache: Path, kernel: Any, as_cuda: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        workers_module, "jit_function", lambda k: ("ldm_sdk.kernels.row_softmax", "_no_such_kernel")
    )
    fused = Softmaxes()
    pending = compile_ahead([fused], lambda: fused(rows(), 64), processes=2)
    report = wait_report(pending)  # failures come back in the report, nothing raises
    assert (report.launches, report.sent, report.compiled, report.failed) == (1, 1, 0, 1)
    assert report.processes == 1
    assert "(1 failed" in str(report)
    [error] = pending.errors
    assert "AttributeError" in error and "_no_such_kernel" in error
    assert not list(triton_cache.rglob("*.cubin"))


# -- CapturedModel.compile_ahead -----------------------------------------------------------------------------
def inputs(batch: int = 2) -> tuple[Tensor, Tensor, Conditioning]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 3.0, dtype=torch.float64)
    return x, t, Conditioning(crossattn=torch.randn(batch, 5, 16, generator=g))


class Counted:
    """``fn(x, t, cond)`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        self.calls += 1
        return x * 2 + t.to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("mode", ["emulate", "off", "auto"])
def test_captured_model_starts_nothing_off_cuda(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compile_ahead called")

    monkeypatch.setattr(ahead_module, "compile_ahead", refuse)
    fn = Counted()
    model = CapturedModel(fn, mode=mode)  # type: ignore[arg-type]
    x, t, cond = inputs()
    assert model.compile_ahead(x, t, cond) is False
    assert fn.calls == 0 and model._pending == {}
    assert model.stats.captures == 0 and model.stats.passthrough == 0


def test_captured_model_in_graph_mode_refuses_cpu_inputs() -> None:
    fn = Counted()
    model = CapturedModel(fn, mode="graph")
    x, t, cond = inputs()
    with pytest.raises(CaptureError, match="mode='graph' captures CUDA graphs, but x is on cpu"):
        model.compile_ahead(x, t, cond)
    with pytest.raises(CaptureError, match="mode='graph' captures CUDA graphs"):
        model(x, t, cond)
    assert fn.calls == 0


class FakePending:
    def __init__(self, compiled: int) -> None:
        self.compiled = compiled
        self.waits = 0

    def wait(self, timeout: float | None = None) -> AheadReport:
        self.waits += 1
        return AheadReport(7, self.compiled, self.compiled, 0, 2, 0.01, 0.5)


class FakeGraph:
    """What ``_capture_graph`` returns, without CUDA: ``replay`` reruns the call into the static output."""

    def __init__(self, call: Callable[[], Tensor], out: Tensor) -> None:
        self.call, self.out, self.replays, self.resets = call, out, 0, 0

    def replay(self) -> None:
        self.replays += 1
        self.out.copy_(self.call())

    def reset(self) -> None:
        self.resets += 1


def test_captured_model_wiring(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA-free: ``_active`` says "capture", the background compilation is a fake."""
    started: list[tuple[list[Any], Callable[[], object]]] = []
    made: list[FakePending | None] = []
    answer: list[FakePending | None] = [FakePending(5)]

    def fake(modules: Any, call: Callable[[], object], **kwargs: Any) -> FakePending | None:
        assert kwargs == {}
        started.append((list(modules), call))
        made.append(answer[0])
        return answer[0]

    graphs: list[FakeGraph] = []

    def fake_capture_graph(
        self: CapturedModel, call: Callable[[], Tensor], device: Any, sig: Any, capture: Any, prologues: Any
    ) -> Any:
        out = call().clone()
        graphs.append(FakeGraph(call, out))
        return graphs[-1], out

    monkeypatch.setattr(CapturedModel, "_active", lambda self, x: True)
    monkeypatch.setattr(ahead_module, "compile_ahead", fake)
    monkeypatch.setattr(CapturedModel, "_capture_graph", fake_capture_graph)
    fn, watched = Counted(), nn.Linear(2, 2).eval()
    model = CapturedModel(fn, mode="auto", modules=[watched])
    x, t, cond = inputs(2)

    assert model.compile_ahead(x, t, cond) is True
    [(modules, call)] = started
    assert modules == [watched, fn]  # the watched modules and fn itself (it may launch kernels too)
    assert fn.calls == 0  # the fake records nothing; the call it got runs fn on these inputs
    assert torch.equal(call(), fn(x, t, cond))  # type: ignore[arg-type]
    fn.calls = 0
    assert len(model._pending) == 1

    # the same signature (other values) is pending already: not started again
    assert model.compile_ahead(x + 1, t, cond) is False
    assert len(started) == 1
    # another shape is started
    x3, t3, cond3 = inputs(3)
    assert model.compile_ahead(x3, t3, cond3) is True
    assert len(started) == 2 and len(model._pending) == 2
    # nothing started (no workers, nothing new): False, and not remembered as pending
    answer[0] = None
    x1, t1, cond1 = inputs(1)
    assert model.compile_ahead(x1, t1, cond1) is False
    assert len(started) == 3 and len(model._pending) == 2
    assert model.compile_ahead(x1, t1, cond1) is False
    assert len(started) == 4  # tried again: nothing was pending
    assert fn.calls == 0

    # the capture of the first signature waits for its compilation and counts what it compiled
    first = made[0]
    assert first is not None
    with torch.no_grad():
        out = model(x, t, cond)
    assert torch.equal(out, fn(x, t, cond))
    assert first.waits == 1
    assert model.stats.compiled_ahead == 5 and model.stats.captures == 1
    assert len(model._pending) == 1  # the other shape's is still there
    assert graphs[0].replays == 1
    # captured now: not started again, and a second call does not wait again
    assert model.compile_ahead(x, t, cond) is False
    assert len(started) == 4
    with torch.no_grad():
        model(x, t, cond)
    assert first.waits == 1 and model.stats.compiled_ahead == 5 and model.stats.captures == 1


# -- the task runner -----------------------------------------------------------------------------------------
SMALL = {"width": 32, "height": 32, "steps": 3}


@pytest.fixture(scope="module")
def emulated() -> Any:
    from ldm_sdk.runtime import Runtime

    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        yield rt


def start_run(runtime: Any, accelerate: bool = True) -> Any:
    from ldm_sdk.tasks.base import TaskInputs, Txt2ImgRequest
    from ldm_sdk.tasks.runner import Run
    from tests.tasks.tiny_models import tiny_bundle

    request = Txt2ImgRequest(prompt="a cat", accelerate=accelerate, **SMALL)
    return Run.start("txt2img", request, runtime, TaskInputs(bundle=tiny_bundle("txt")), None)


def test_runner_compile_decoder_ahead(emulated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm_sdk.tasks import runner

    asked: list[tuple[Tensor, Tensor, Conditioning, bool]] = []

    def spy(self: CapturedModel, x: Tensor, t: Tensor, cond: Conditioning) -> bool:
        asked.append((x, t, cond, torch.is_inference_mode_enabled()))
        return True

    monkeypatch.setattr(CapturedModel, "compile_ahead", spy)
    run = start_run(emulated)
    assert run.device.type == "cpu"
    assert isinstance(run.captured_decoder, CapturedModel)  # there is a decoder: the device says no
    shape = run.latent_shape(32, 32)
    assert run.compile_decoder_ahead(shape) is False
    assert asked == []
    no_fast_path = start_run(emulated, accelerate=False)
    assert no_fast_path.captured_decoder is None
    assert no_fast_path.compile_decoder_ahead(shape) is False

    # the CUDA branch, CUDA-free: the runner's torch.zeros makes the latent on the CPU
    class TorchOnCpu:
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def zeros(size: Any, *, device: Any, dtype: torch.dtype) -> Tensor:
            devices.append(device)
            return torch.zeros(size, dtype=dtype)

    devices: list[Any] = []
    monkeypatch.setattr(runner, "torch", TorchOnCpu())
    run.device = torch.device("cuda", 0)
    run.dtype = torch.float16
    assert run.compile_decoder_ahead((2, *shape[1:])) is True
    [(z, t, cond, inference)] = asked
    assert devices == [torch.device("cuda", 0)]
    assert tuple(z.shape) == (1, *shape[1:])  # one item, as decode() feeds the decoder
    assert z.dtype == torch.float16 and t.shape == (1,) and cond.parts() == {}
    assert inference

    # an optimisation only: a failure there is a warning, the task goes on (the decode compiles itself)
    def broken(self: CapturedModel, x: Tensor, t: Tensor, cond: Conditioning) -> bool:
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(CapturedModel, "compile_ahead", broken)
    with pytest.warns(RuntimeWarning, match=r"compiling the decoder's kernels ahead failed \(RuntimeError"):
        assert run.compile_decoder_ahead(shape) is False


def test_sample_latents_starts_decoder_compilation(emulated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm_sdk.tasks import get_task, runner
    from ldm_sdk.tasks.base import TaskInputs, Txt2ImgRequest
    from tests.tasks.tiny_models import tiny_bundle

    shapes: list[tuple[int, ...]] = []
    sampled: list[bool] = []
    original = runner.Run.sample

    def spy(self: Any, shape: tuple[int, ...]) -> bool:
        assert not sampled, "started after sampling"
        shapes.append(tuple(shape))
        return False

    def sample(self: Any, item: Any, group: int = 1) -> Tensor:
        sampled.append(True)
        return original(self, item, group)

    monkeypatch.setattr(runner.Run, "compile_decoder_ahead", spy)
    monkeypatch.setattr(runner.Run, "sample", sample)
    bundle = tiny_bundle("txt")
    request = Txt2ImgRequest(prompt="a cat", **SMALL)
    result = get_task("txt2img")(request, emulated, inputs=TaskInputs(bundle=bundle))
    assert len(result.images) == 1 and sampled
    f = bundle.downsampling_factor
    assert shapes == [(1, bundle.latent_channels, 32 // f, 32 // f)]


@pytest.mark.parametrize(("decode_tile", "whole"), [(None, True), ((16, 16), False)])
def test_tiled_tasks_compile_the_decoder_ahead_only_for_a_whole_decode(
    decode_tile: tuple[int, int] | None, whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode through windows never calls the captured decoder on the whole latent: recording that call
    would allocate the very activations the windows avoid, so nothing is compiled ahead for it."""
    from ldm_sdk.tasks import tiled

    seen: list[dict[str, Any]] = []

    class FakeRun:
        def sample_latents(self, guided: Any, shape: Any, **kwargs: Any) -> Tensor:
            seen.append(kwargs)
            return torch.zeros(shape)

    monkeypatch.setattr(tiled, "_denoiser", lambda *args: "windows")
    plan = tiled.Tiling((8, 8), 2, decode_tile, 2, 8, "request")
    tiled.sample_latents(FakeRun(), None, (1, 4, 32, 32), plan)  # type: ignore[arg-type]
    assert seen == [{"whole_decode": whole, "denoiser": "windows"}]


def test_stand_ins_specialise_as_the_real_arguments() -> None:
    """The background thread asks Triton for specializations from stand-ins that keep a tensor's dtype and
    address but not its memory: the answer must be the real arguments' (alignment included)."""
    from ldm_sdk.accel.triton_kernels import Launch, TensorDescriptor
    from ldm_sdk.accel.triton_kernels import stand_ins as _stand_ins
    from ldm_sdk.kernels.compile_workers import specialization_of
    from ldm_sdk.kernels.geglu_tma import _geglu_tma_kernel

    x = torch.zeros(1000, dtype=torch.float16)
    with compile_only_driver(TARGET):
        for t in (x, x[1:], x[8:]):  # 16-byte aligned, not, aligned again
            real = Launch(_softmax_rows_kernel, (64,), (t, 4096), {"BLOCK": 4096, "num_warps": 8})
            stand_in = _stand_ins(real)
            assert not any(isinstance(a, Tensor) for a in stand_in.args)
            assert specialization_of(*_parts(stand_in)) == specialization_of(*_parts(real))
        if TensorDescriptor is None:
            return
        a, w, y = (torch.zeros(r, 320, dtype=torch.float16) for r in (256, 640, 256))
        args = (
            TensorDescriptor.from_tensor(a, [128, 64]),
            TensorDescriptor.from_tensor(w, [128, 64]),
            TensorDescriptor.from_tensor(y, [128, 128]),
            torch.zeros(640, dtype=torch.float16),
            256,
            320,
            320,
        )
        options = {"PROGRAMS": 132, "HAS_BIAS": True, "BF16": False, "BLOCK_M": 128, "BLOCK_N": 128}
        options |= {"BLOCK_K": 64, "GROUP_M": 8, "FLATTEN": False, "STAGES": 3, "num_warps": 8}
        real = Launch(_geglu_tma_kernel, (132,), args, options)
        stand_in = _stand_ins(real)
        assert not any(isinstance(getattr(a, "base", a), Tensor) for a in stand_in.args)
        assert specialization_of(*_parts(stand_in)) == specialization_of(*_parts(real)) is not None


def _parts(launch: Any) -> tuple[Any, Any, Any, Any]:
    return launch.kernel, launch.args, launch.grid, launch.kwargs
