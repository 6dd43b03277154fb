"""Compiling Triton kernel variants in worker processes (``ldm_sdk.kernels.compile_workers``).

CPU, against Triton itself: no GPU is needed, because Triton compiles for a CUDA target without one when
:func:`compile_only_driver` makes the compile-only stand-in driver active (here for sm_90). The real
row-softmax kernel (``ldm_sdk.kernels.row_softmax``) is compiled by real worker processes into Triton's
on-disk cache, which every test points at its own empty folder (``TRITON_CACHE_DIR``, set before the workers
start: they copy the environment then). Checked:

- a variant compiled in a worker lands in that cache (its ``.cubin``), and this process's own compile of the
  same variant afterwards is a cache hit: Triton's front end (``ASTSource.make_ir``, patched to raise) is
  never reached, while it is for a variant nobody compiled;
- different variants have different serialized specializations, a specialization is the same string each
  time it is asked for (what the parent's de-duplication relies on), asking compiles nothing, and once this
  process has the variant Triton no longer asks (``specialization_of`` returns None);
- bad jobs (unknown kernel, missing module, another backend) come back as failures naming the problem, and
  the worker goes on serving the jobs after them; a specialization made for another architecture than the
  job's target is refused; and one worker compiles consistent jobs for two architectures, each for its
  own (Triton keeps a per-device target cache that the worker resets when a job's target differs);
- a worker that cannot start, or that is killed, fails the jobs it would have had with an error saying it
  exited instead of leaving :meth:`CompileWorkers.results` waiting; with two workers the live one takes the
  rest; a worker that does not say it is ready, or answers a job with something that is not a reply,
  fails its job with what it said and is ended; :meth:`CompileWorkers.close` returns promptly afterwards
  (all guarded by thread time-outs, so a hang fails the test instead of stalling the run);
- the small pieces: ``KernelJob`` JSON round trip, ``Target.gpu_target``, the stand-in driver's answers, the
  previous driver restored, ``python_executable`` and ``jit_function``.

Deviation forced by Triton: a JIT function keeps the variants compiled in this process in its
``device_caches``, so a variant compiled by one test would make ``specialization_of`` return None in the
next; the ``kernel`` fixture gives the real kernel an empty in-process cache for each test (monkeypatched,
restored afterwards). ``JobResult.launcher`` is not asserted: it is False without ``libcuda`` (here), and
Triton 3.8's CUDA launcher is generic (``cuda_utils.launch``), so there is nothing per variant to check.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from triton.runtime.driver import driver

from ldm_sdk.kernels.compile_workers import (
    MARKS_FOLDER,
    CompileOnlyDriver,
    CompileWorkers,
    JobResult,
    KernelJob,
    Target,
    compile_only_driver,
    compiled_mark,
    jit_function,
    leave_mark,
    python_executable,
    specialization_of,
)
from ldm_sdk.kernels.row_softmax import _softmax_rows_kernel

TARGET = Target("cuda", 90, 32, 0)
KERNEL_NAME = ("ldm_sdk.kernels.row_softmax", "_softmax_rows_kernel")


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real row-softmax kernel with an empty in-process cache (the original is restored afterwards)."""
    monkeypatch.setattr(
        _softmax_rows_kernel, "device_caches", defaultdict(_softmax_rows_kernel.create_binder)
    )
    return _softmax_rows_kernel


def spec_of(kernel: Any, block: int, num_warps: int = 4) -> str | None:
    with compile_only_driver(TARGET):
        return specialization_of(
            kernel, (torch.float16, block), (64,), {"BLOCK": block, "num_warps": num_warps}
        )


def warmup(kernel: Any, block: int, num_warps: int = 4) -> Any:
    with compile_only_driver(TARGET):
        return kernel.warmup(torch.float16, block, grid=(64,), BLOCK=block, num_warps=num_warps)


def job_for(kernel: Any, spec: str | None, target: Target = TARGET) -> KernelJob:
    name = jit_function(kernel)
    assert name is not None and spec is not None
    return KernelJob(*name, spec, target)


def ping_job() -> KernelJob:
    """A job a worker answers at once (with a failure: the kernel does not exist)."""
    return KernelJob("ldm_sdk.kernels.row_softmax", "_no_such_kernel", "{}", TARGET)


def collect(workers: CompileWorkers, timeout: float = 120.0) -> list[JobResult]:
    """``workers.results()`` on a thread, failing the test when it does not finish in ``timeout`` seconds."""
    out: list[JobResult] = []
    thread = threading.Thread(target=lambda: out.extend(workers.results()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"results() still waiting after {timeout} s: a job was lost"
    return out


def close_promptly(workers: CompileWorkers, limit: float = 20.0) -> None:
    start = time.perf_counter()
    thread = threading.Thread(target=workers.close, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"close() still running after {limit} s"
    assert time.perf_counter() - start < limit


def refuse_compile(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("compiled in the parent")


# -- compiling -----------------------------------------------------------------------------------------------
def test_worker_compiles_into_the_cache_and_the_parent_only_loads(
    triton_cache: Path, kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_of(kernel, 4096, num_warps=8)
    assert spec is not None
    assert json.loads(spec)["name"] == "ldm_sdk.kernels.row_softmax._softmax_rows_kernel"
    assert not list(triton_cache.rglob("*.cubin")), "asking for the specialization must not compile"
    job = job_for(kernel, spec)

    with CompileWorkers(1) as workers:
        workers.submit(job)
        [result] = collect(workers)

    assert result.job == job
    assert result.ok, result.error
    assert result.error == ""
    assert result.compile_s > 0
    assert result.launcher_s >= 0
    cubins = list(triton_cache.rglob("_softmax_rows_kernel.cubin"))
    assert len(cubins) == 1

    monkeypatch.setattr(ASTSource, "make_ir", refuse_compile)
    with pytest.raises(AssertionError, match="compiled in the parent"):
        warmup(kernel, 2048)  # the patch bites: a variant nobody compiled reaches Triton's front end
    compiled = warmup(kernel, 4096, num_warps=8)  # the worker's variant: a cache hit
    assert compiled.metadata.name == "_softmax_rows_kernel"
    assert compiled.metadata.num_warps == 8
    assert compiled.asm["cubin"] == cubins[0].read_bytes()
    assert len(list(triton_cache.rglob("*.cubin"))) == 1


def test_variants_have_their_own_specializations_and_compile(triton_cache: Path, kernel: Any) -> None:
    small, large = spec_of(kernel, 1024), spec_of(kernel, 4096)
    assert small is not None and large is not None
    assert small != large
    assert json.loads(small)["constant_vals"] == [1024]
    assert json.loads(large)["constant_vals"] == [4096]
    # asking again gives the same string (the parent de-duplicates jobs by it) and compiled nothing
    assert spec_of(kernel, 1024) == small
    assert spec_of(kernel, 4096) == large
    assert not list(triton_cache.rglob("*.cubin"))

    with CompileWorkers(2) as workers:
        workers.submit(job_for(kernel, small))
        workers.submit(job_for(kernel, large))
        results = collect(workers)

    assert sorted(r.job.specialization for r in results) == sorted([small, large])
    assert all(r.ok for r in results), [r.error for r in results]
    assert len(list(triton_cache.rglob("_softmax_rows_kernel.cubin"))) == 2

    warmup(kernel, 1024)  # this process now has the small variant (from the cache)
    assert spec_of(kernel, 1024) is None  # Triton does not ask for a variant it has
    assert spec_of(kernel, 4096) == large  # nor forgets to for one it has not


# -- bad jobs ------------------------------------------------------------------------------------------------
def test_bad_jobs_fail_with_their_error_and_the_worker_goes_on(triton_cache: Path, kernel: Any) -> None:
    spec = spec_of(kernel, 2048)
    good = job_for(kernel, spec)
    unknown_kernel = KernelJob("ldm_sdk.kernels.row_softmax", "_no_such_kernel", good.specialization, TARGET)
    missing_module = KernelJob("ldm_sdk.kernels.no_such_module", good.name, good.specialization, TARGET)
    other_backend = job_for(kernel, spec, Target("hip", 90, 64, 0))
    jobs = [unknown_kernel, missing_module, other_backend, good]

    with CompileWorkers(1) as workers:  # one worker: the good job comes after the bad ones
        for job in jobs:
            workers.submit(job)
        results = {r.job: r for r in collect(workers)}
        assert workers._procs[0].poll() is None, "the worker exited"

    assert set(results) == set(jobs)
    for job in jobs[:-1]:
        assert not results[job].ok
    assert "AttributeError" in results[unknown_kernel].error
    assert "_no_such_kernel" in results[unknown_kernel].error
    assert "No module named 'ldm_sdk.kernels.no_such_module'" in results[missing_module].error
    assert "only CUDA targets" in results[other_backend].error
    assert "'hip'" in results[other_backend].error
    assert results[good].ok, results[good].error
    assert list(triton_cache.rglob("_softmax_rows_kernel.cubin"))


def test_specialization_for_another_target_fails(triton_cache: Path, kernel: Any) -> None:
    """A job whose target (sm_80) is not the one its specialization was made for (sm_90) is refused by
    Triton's ``preload`` in the worker (checked as the worker's first job: see the next test)."""
    mismatched = job_for(kernel, spec_of(kernel, 2048), Target("cuda", 80, 32, 0))
    with CompileWorkers(1) as workers:
        workers.submit(mismatched)
        [result] = collect(workers)
    assert not result.ok
    assert "Specialization data is for" in result.error
    assert not list(triton_cache.rglob("*.cubin"))


def test_worker_honours_each_jobs_target(
    triton_cache: Path, kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = []
    for arch in (80, 90):
        target = Target("cuda", arch, 32, 0)
        monkeypatch.setattr(kernel, "device_caches", defaultdict(kernel.create_binder))  # this arch's spec
        with compile_only_driver(target):
            spec = specialization_of(kernel, (torch.float16, 1024), (64,), {"BLOCK": 1024})
        jobs.append(job_for(kernel, spec, target))
    with CompileWorkers(1) as workers:  # one worker gets both, sm_80 first
        for job in jobs:
            workers.submit(job)
        results = {r.job.target.arch: r for r in collect(workers)}
    assert results[80].ok, results[80].error
    assert results[90].ok, results[90].error


# -- dying workers -------------------------------------------------------------------------------------------
def test_worker_that_cannot_start_fails_the_jobs(triton_cache: Path) -> None:
    exits_at_once = shutil.which("false")
    if exits_at_once is None:
        pytest.skip("no `false` program to stand in for a worker that exits at once")
    workers = CompileWorkers(1, python=exits_at_once)  # runs `false -m ldm_sdk.kernels.compile_workers`
    try:
        workers.submit(ping_job())
        workers.submit(ping_job())
        first = collect(workers, timeout=60)
        workers.submit(ping_job())  # after every worker has gone: fails at once
        later = collect(workers, timeout=60)
    finally:
        close_promptly(workers)
    assert len(first) == 2 and len(later) == 1
    for result in first + later:
        assert not result.ok
        assert "compile worker 0 exited" in result.error
    assert "no compile worker alive" in later[0].error


def fake_worker(tmp_path: Path, body: str) -> str:
    """An executable standing in for the worker's interpreter: a shell script with ``body``."""
    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_worker_without_a_ready_line_fails_the_jobs(triton_cache: Path, tmp_path: Path) -> None:
    workers = CompileWorkers(1, python=fake_worker(tmp_path, "echo hello; sleep 60"))
    try:
        workers.submit(ping_job())
        [failed] = collect(workers, timeout=60)
    finally:
        close_promptly(workers)
    assert not failed.ok
    assert "started with 'hello' instead of a ready line" in failed.error


def test_worker_with_a_garbled_reply_is_ended_and_its_job_failed(triton_cache: Path, tmp_path: Path) -> None:
    body = 'echo \'{"ready": true}\'; read job; echo "not json"; sleep 60'
    workers = CompileWorkers(1, python=fake_worker(tmp_path, body))
    try:
        workers.submit(ping_job())
        [failed] = collect(workers, timeout=60)
        workers.submit(ping_job())
        [after] = collect(workers, timeout=60)
    finally:
        close_promptly(workers)  # the stuck worker was killed: no 60 s wait
    assert not failed.ok
    assert "answered 'not json'" in failed.error
    assert "no compile worker alive" in after.error


def test_killed_worker_fails_its_job_instead_of_hanging(triton_cache: Path) -> None:
    workers = CompileWorkers(1)
    try:
        workers.submit(ping_job())
        [answered] = collect(workers)
        assert "_no_such_kernel" in answered.error  # the worker was up and serving
        workers._procs[0].kill()
        workers._procs[0].wait(timeout=10)
        workers.submit(ping_job())
        [lost] = collect(workers, timeout=60)
        workers.submit(ping_job())
        [after] = collect(workers, timeout=60)
    finally:
        close_promptly(workers)
    assert not lost.ok
    assert "compile worker 0 exited" in lost.error
    assert f"code {-signal.SIGKILL}" in lost.error
    assert not after.ok
    assert "no compile worker alive" in after.error


def test_live_worker_takes_the_jobs_of_a_killed_one(triton_cache: Path) -> None:
    workers = CompileWorkers(2)
    try:
        workers._procs[0].kill()
        workers._procs[0].wait(timeout=10)
        for _ in range(4):
            workers.submit(ping_job())
        results = collect(workers)
        assert workers._procs[1].poll() is None
    finally:
        close_promptly(workers)
    assert len(results) == 4
    lost = [r for r in results if "exited" in r.error]
    served = [r for r in results if "_no_such_kernel" in r.error]
    assert len(lost) <= 1  # at most the job the killed worker's feeder had taken
    assert len(served) == 4 - len(lost)


# -- the small pieces ----------------------------------------------------------------------------------------
def test_kernel_job_json_round_trip() -> None:
    job = KernelJob(*KERNEL_NAME, '{"a": [1, "x"]}', Target("cuda", 89, 32, 3))
    line = job.to_json()
    assert "\n" not in line  # one job per line
    back = KernelJob.from_json(line)
    assert back == job
    assert back.target == Target("cuda", 89, 32, 3)
    assert hash(back) == hash(job)  # jobs key the parent's de-duplication


def test_compiled_marks_name_the_installation_the_source_and_the_job(triton_cache: Path) -> None:
    job = KernelJob(*KERNEL_NAME, '{"a": 1}', TARGET)
    mark = compiled_mark(job, "key-1")
    assert mark is not None and mark.parent == triton_cache / MARKS_FOLDER
    assert len(mark.name) == 64 and int(mark.name, 16) >= 0  # a sha256
    assert compiled_mark(KernelJob.from_json(job.to_json()), "key-1") == mark  # the same job, again
    assert compiled_mark(job, "key-2") != mark  # another Triton installation
    assert compiled_mark(KernelJob(*KERNEL_NAME, '{"a": 2}', TARGET), "key-1") != mark  # another variant
    assert compiled_mark(KernelJob(*KERNEL_NAME, '{"a": 1}', Target("cuda", 89, 32, 0)), "key-1") != mark
    with pytest.MonkeyPatch.context() as mp:  # the kernel's source changed (an upgrade): another mark
        mp.setattr(sys.modules[KERNEL_NAME[0]], KERNEL_NAME[1], SimpleNamespace(cache_key="changed"))
        assert compiled_mark(job, "key-1") not in (mark, None)
    assert compiled_mark(job, "key-1") == mark
    # a kernel the parent cannot import gets no mark (its job is always sent)
    assert (
        compiled_mark(KernelJob("ldm_sdk.kernels.row_softmax", "_no_such_kernel", "{}", TARGET), "k") is None
    )
    assert not mark.exists()
    leave_mark(mark)
    assert mark.is_file()
    leave_mark(mark)  # again: no error
    leave_mark(None)


def test_compiled_marks_follow_the_cache_and_an_unwritable_cache_leaves_none(
    triton_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = KernelJob(*KERNEL_NAME, "{}", TARGET)
    mark = compiled_mark(job, "key")
    other = tmp_path / "other-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(other))
    moved = compiled_mark(job, "key")
    assert moved is not None and mark is not None
    assert moved.parent == other / MARKS_FOLDER and moved.name == mark.name
    other.write_text("a file where the cache folder should be")
    leave_mark(moved)  # cannot be written: no mark, no error
    assert not moved.exists()


def test_target_and_compile_only_driver() -> None:
    assert TARGET.gpu_target() == GPUTarget("cuda", 90, 32)
    stand_in = CompileOnlyDriver(Target("cuda", 90, 32, 2))
    assert stand_in.get_device_capability() == (9, 0)
    assert CompileOnlyDriver(Target("cuda", 86, 32, 0)).get_device_capability() == (8, 6)
    assert stand_in.get_current_device() == 2
    assert stand_in.get_current_stream() == 0
    assert stand_in.get_current_target() == GPUTarget("cuda", 90, 32)


def test_compile_only_driver_restores_the_previous_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    before = driver._active
    with compile_only_driver(TARGET) as stand_in:
        assert driver._active is stand_in
        assert driver.active.get_current_target() == GPUTarget("cuda", 90, 32)
    assert driver._active is before

    previous = object()  # a driver that was active: it comes back, also when the block raises
    monkeypatch.setattr(driver, "_active", previous)
    with pytest.raises(RuntimeError, match="inside"), compile_only_driver(TARGET):
        assert isinstance(driver._active, CompileOnlyDriver)
        raise RuntimeError("inside")
    assert driver._active is previous


def test_python_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sys.executable
    assert Path(real).name.lower().startswith("python")  # what the next line relies on
    assert python_executable() == real
    monkeypatch.setattr(sys, "executable", "/usr/bin/krita")
    assert python_executable() is None
    with pytest.raises(RuntimeError, match="krita"):
        CompileWorkers(1)
    monkeypatch.setattr(sys, "executable", "")
    assert python_executable() is None
    monkeypatch.setattr(sys, "executable", "/opt/python/bin/python3.11")
    assert python_executable() == "/opt/python/bin/python3.11"


def test_compile_workers_needs_a_process() -> None:
    with pytest.raises(ValueError, match="processes"):
        CompileWorkers(0)


def test_jit_function() -> None:
    assert jit_function(_softmax_rows_kernel) == KERNEL_NAME
    assert jit_function(object()) is None
    assert jit_function(None) is None
    assert jit_function(_softmax_rows_kernel.fn) is None  # the plain Python function

    @triton.jit
    def local_kernel(x_ptr):  # pragma: no cover - never compiled
        pass

    assert jit_function(local_kernel) is None  # a worker could not import it


def test_specialization_hook_is_only_there_for_the_asking_thread() -> None:
    """While one thread asks for a specialization, Triton's process-wide hook must not skip (or record) the
    compiles of other threads: there it hands over to the hook installed before, or to none."""
    from ldm_sdk.kernels.compile_workers import _SpecializationHook

    calls: list[str] = []

    def before(**info: Any) -> str:
        calls.append(threading.current_thread().name)
        return "previous hook's answer"

    info = {"compile": {"specialization_data": "{spec}"}}
    hook = _SpecializationHook(before)
    assert hook(**info) is True and hook.seen == ["{spec}"]  # the asking thread: kept, compile skipped
    answers: list[Any] = []
    other = threading.Thread(target=lambda: answers.append(hook(**info)), name="other")
    other.start()
    other.join(10)
    assert answers == ["previous hook's answer"] and calls == ["other"] and hook.seen == ["{spec}"]
    bare = _SpecializationHook(None)
    other = threading.Thread(target=lambda: answers.append(bare(**info)))
    other.start()
    other.join(10)
    assert answers[-1] is None and bare.seen == []  # no hook before: that thread compiles as usual


def test_worker_adopts_the_parents_triton_key_only_for_the_same_installation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker takes the parent's key of Triton's installation instead of hashing Triton's 0.5 GB library
    again -- only when it runs the same Triton package (the key names cache entries the parent loads)."""
    from triton.runtime import cache

    from ldm_sdk.kernels.compile_workers import (
        TRITON_FILE_ENV,
        TRITON_KEY_ENV,
        adopt_triton_key,
        triton_install_key,
    )

    monkeypatch.setattr(cache, "triton_key", cache.triton_key)  # restored afterwards
    file, key = triton_install_key()
    assert key == cache.triton_key() and file.endswith("__init__.py")
    assert adopt_triton_key({}) is False
    elsewhere = {TRITON_FILE_ENV: "/elsewhere/triton/__init__.py", TRITON_KEY_ENV: "other"}
    assert adopt_triton_key(elsewhere) is False
    assert cache.triton_key() == key
    assert adopt_triton_key({TRITON_FILE_ENV: file, TRITON_KEY_ENV: "the parent's key"}) is True
    assert cache.triton_key() == "the parent's key"
