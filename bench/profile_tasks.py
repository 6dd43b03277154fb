"""Where a task's time goes outside the denoising loop: each phase of a task run timed alone.

    python bench/profile_tasks.py --random-model sd15 --device cuda --dtype fp16 --out phases.json
    python bench/profile_tasks.py --random-model sd15-ci --tasks txt2img,inpaint --steps 4   # CPU

The tasks run as ``ldm-sdk bench-tasks`` runs them (same synthetic inputs and requests,
:func:`ldm_sdk.benchmarks.tasks.build_job`). For the timed runs the phases of
:class:`ldm_sdk.tasks.runner.Run` are wrapped with a device synchronization and a clock on each side:
``start`` (model from the runtime's cache, task check, sampler plan), ``conditioning`` (prompt encoding),
``encode`` (first-stage encode of an input image), ``compile_decoder_ahead``, ``sample`` (the sampler loop
over the batch items), ``decode`` and ``finish`` (manifest). ``other`` is the rest of the call: input
reading, mask preparation, size fitting, blending. The synchronizations make each phase's GPU work count in
that phase (the task itself never waits between phases), so the sum is a little above an unwrapped run,
which is timed too (``plain_s``). The first run's phases are recorded as well (``first_run_phases_s``): it
builds the condition encoder and, on CUDA, captures the graphs.

``--check-eager`` compares one run of each task with one of the same request run eagerly
(``accelerate=False``): whether the images are the same bytes and how far apart the latents are.

``--trace`` also records one warm run of each task with ``torch.profiler`` and lists its CPU operators by
self time and, on CUDA, the kernels by GPU time (``--top`` rows each). ``--pyprofile`` runs each task's
first run under ``cProfile`` and lists the functions with the most cumulative time: where a first run's
seconds go (imports, building the condition encoder, first kernel launches); its phase times then include
the profiler's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm_sdk.benchmarks import common as C
from ldm_sdk.benchmarks import tasks as bench_tasks
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import TaskRequest, parse_request
from ldm_sdk.tasks.context import bundle_device_dtype, default_size, load_bundle
from ldm_sdk.tasks.runner import Run

#: the Run methods timed, none of which calls another of them
PHASES = ("start", "conditioning", "encode", "compile_decoder_ahead", "sample", "decode", "finish")


@contextlib.contextmanager
def phase_clocks(device: torch.device) -> Iterator[dict[str, float]]:
    """Wrap :data:`PHASES` of :class:`Run` with a synchronized clock; yields the seconds per phase, summed
    over the calls inside the block. The methods are restored on exit."""
    spent: dict[str, float] = defaultdict(float)
    saved = {name: Run.__dict__[name] for name in PHASES}

    def clocked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            C.sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                C.sync(device)
                spent[name] += time.perf_counter() - t0

        return wrapper

    try:
        for name, attr in saved.items():
            if isinstance(attr, classmethod):
                setattr(Run, name, classmethod(clocked(name, attr.__func__)))
            else:
                setattr(Run, name, clocked(name, attr))
        yield spent
    finally:
        for name, attr in saved.items():
            setattr(Run, name, attr)


def trace(call: Callable[[], Any], device: torch.device, top: int) -> dict[str, Any]:
    """One run of ``call`` under ``torch.profiler``: the ``top`` CPU operators by self time and, on CUDA, the
    ``top`` kernels by GPU time, with the total kernel count."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        C.sync(device)
    events = prof.key_averages()
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out: dict[str, Any] = {
        "cpu_ops": [
            {"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in cpu
        ]
    }
    if device.type == "cuda":
        kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        out["kernels_total"] = sum(e.count for e in kernels)
        out["kernel_ms_total"] = sum(e.self_device_time_total for e in kernels) / 1e3
        out["kernels"] = [
            {"name": e.key[:120], "calls": e.count, "gpu_ms": e.self_device_time_total / 1e3}
            for e in kernels[:top]
        ]
    return out


def profile_task(
    job: bench_tasks.TaskJob,
    runtime: Any,
    device: torch.device,
    repeats: int,
    top: int,
    with_trace: bool,
    pyprofile: bool = False,
) -> dict[str, Any]:
    """A first run (under ``cProfile`` with ``pyprofile``), ``repeats`` plain runs, ``repeats`` runs with
    the phase clocks, one traced run."""
    task = get_task(job.name, runtime)

    def call() -> Any:
        return task(job.request, runtime, inputs=job.inputs)

    profiler = cProfile.Profile() if pyprofile else None
    with phase_clocks(device) as spent, profiler or contextlib.nullcontext():
        first_s, _ = C.wall(call, device)
    first_phases = {name: spent.get(name, 0.0) for name in PHASES}
    first_phases["other"] = first_s - sum(first_phases.values())
    plain = [C.wall(call, device)[0] for _ in range(repeats)]
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        with phase_clocks(device) as spent:
            total, _ = C.wall(call, device)
        phases = {name: spent.get(name, 0.0) for name in PHASES}
        phases["other"] = total - sum(phases.values())
        phases["total"] = total
        runs.append(phases)
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result: dict[str, Any] = {
        "task": job.name,
        "first_run_s": first_s,
        "first_run_phases_s": first_phases,
        "plain_s": plain,
        "plain_median_s": statistics.median(plain),
        "phases_median_s": medians,
        "phase_runs": runs,
    }
    if profiler is not None:
        result["first_run_python_profile"] = python_profile(profiler, top)
    if with_trace:
        result["trace"] = trace(call, device, top)
    return result


def against_eager(job: bench_tasks.TaskJob, runtime: Any) -> dict[str, Any]:
    """One run of ``job`` as timed (the fast path where the request has it) against one with
    ``accelerate=False``: whether the images are the same bytes, and the largest latent difference
    relative to the eager latents' largest magnitude."""
    task = get_task(job.name, runtime)
    fast = task(job.request, runtime, inputs=job.inputs)
    eager = task(job.request.model_copy(update={"accelerate": False}), runtime, inputs=job.inputs)
    same = all(
        a.shape == b.shape and bool((a == b).all()) for a, b in zip(fast.images, eager.images, strict=True)
    )
    report: dict[str, Any] = {"images_equal": same}
    if fast.latents is not None and eager.latents is not None:
        diff = (fast.latents.double() - eager.latents.double()).abs().max()
        report["latents_max_rel_diff"] = float(diff / eager.latents.double().abs().max())
    return report


def python_profile(profiler: cProfile.Profile, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions of a ``cProfile`` run by cumulative time, outside importlib's own frames (an
    import shows as the module's ``<module>`` entry)."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, self_s, cum_s, _) in stats.items():
        if "importlib" in file or file.startswith("<frozen"):
            continue
        rows.append({"function": f"{file}:{line}({name})", "calls": calls, "cum_s": cum_s, "self_s": self_s})
    rows.sort(key=lambda r: r["cum_s"], reverse=True)
    return rows[:top]


def show(results: list[dict[str, Any]]) -> None:
    head = ["task", "plain", *PHASES, "other", "total"]
    print(" | ".join(head))
    for r in results:
        m = r["phases_median_s"]
        cells = [r["task"], f"{r['plain_median_s'] * 1e3:.1f}"]
        cells += [f"{m[k] * 1e3:.1f}" for k in (*PHASES, "other", "total")]
        print(" | ".join(cells))
    print("(milliseconds, medians)")
    for r in results:
        m = r["first_run_phases_s"]
        print(f"{r['task']} first run: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in m.items() if v >= 5e-4))
    for r in results:
        rows = r.get("first_run_python_profile")
        if rows:
            print(f"\n{r['task']} first run: top Python functions by cumulative time (under cProfile)")
            for e in rows:
                print(f"  {e['cum_s'] * 1e3:9.1f} ms  {e['calls']:7d}x  {e['function'][-110:]}")
    for r in results:
        t = r.get("trace")
        if not t:
            continue
        print(f"\n{r['task']}: top CPU operators by self time")
        for e in t["cpu_ops"]:
            print(f"  {e['self_cpu_ms']:9.2f} ms  {e['calls']:6d}x  {e['name']}")
        if "kernels" in t:
            print(f"{r['task']}: {t['kernels_total']} kernels, {t['kernel_ms_total']:.2f} ms GPU; top:")
            for e in t["kernels"]:
                print(f"  {e['gpu_ms']:9.3f} ms  {e['calls']:6d}x  {e['name']}")


def cuda_memory(device: Any) -> dict[str, int]:
    """On CUDA, with the model and every run's graphs still held: the memory torch reserves now (the
    allocator's free blocks returned first), at its peak, and the peak allocated, in MiB; else empty."""
    import torch

    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    peak_reserved = torch.cuda.max_memory_reserved(device)
    torch.cuda.empty_cache()
    return {
        "reserved": torch.cuda.memory_reserved(device) >> 20,
        "peak_reserved": peak_reserved >> 20,
        "peak_allocated": torch.cuda.max_memory_allocated(device) >> 20,
    }


def main(argv: list[str] | None = None) -> None:
    from ldm_sdk.benchmarks.random_models import RANDOM_MODELS, random_model_file
    from ldm_sdk.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a model file")
    source.add_argument("--random-model", choices=sorted(RANDOM_MODELS), help="random weights of this layout")
    parser.add_argument("--random-dir", help="where to write / reuse the random model (default: a temp dir)")
    parser.add_argument("--tasks", type=lambda s: tuple(s.split(",")), help="comma-separated (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype")
    parser.add_argument("--steps", type=int, help="default: bench-tasks' (10 on the CPU, 50 elsewhere)")
    parser.add_argument("--size", type=int, help="square side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--together", action="store_true", help="batch_mode 'together' (default: items)")
    parser.add_argument("--trace", action="store_true", help="profile one more run of each task")
    parser.add_argument(
        "--pyprofile",
        action="store_true",
        help="run each task's first run under cProfile and list its top functions (the first run's times "
        "then include the profiler's overhead)",
    )
    parser.add_argument(
        "--check-eager",
        action="store_true",
        help="after the timings, compare one run of each task with its eager run (accelerate=False)",
    )
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        model = args.model
        if args.random_model:
            folder = args.random_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ldm-sdk-"))
            model = str(random_model_file(args.random_model, folder, seed=0))
        runtime = stack.enter_context(Runtime.create(device=args.device, dtype=args.dtype))
        placement = {k: v for k, v in {"device": args.device, "dtype": args.dtype}.items() if v is not None}
        base = parse_request(TaskRequest, {"model": model, **placement})
        bundle = load_bundle(base, runtime)
        device, _ = bundle_device_dtype(bundle)
        registry = runtime.registries.condition_encoders
        names = bench_tasks.select_tasks(bundle, registry, args.tasks)
        size = (args.size, args.size) if args.size else default_size(bundle)
        steps = args.steps or (bench_tasks.CPU_STEPS if device.type == "cpu" else bench_tasks.GPU_STEPS)
        mode = "together" if args.together else "items"
        common = {"model": model, **placement, "steps": steps, "seed": 0}
        common |= {"batch": args.batch, "batch_mode": mode}
        jobs = [bench_tasks.build_job(name, bundle, registry, size, common) for name in names]
        results = [
            profile_task(job, runtime, device, args.repeats, args.top, args.trace, args.pyprofile)
            for job in jobs
        ]
        if args.check_eager:
            for job, result in zip(jobs, results, strict=True):
                result["against_eager"] = against_eager(job, runtime)
                print(f"{job.name} against its eager run: {result['against_eager']}")
        memory = cuda_memory(device)
    env = bench_tasks.environment(device)
    show(results)
    if memory:
        print("CUDA memory [MiB]: " + ", ".join(f"{k} {v}" for k, v in memory.items()))
    if args.out:
        report = {"model": args.model or args.random_model, "size": size, "steps": steps, "env": env}
        report |= {"batch": args.batch, "batch_mode": mode, "cuda_memory_mib": memory}
        Path(args.out).write_text(json.dumps({**report, "tasks": results}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
