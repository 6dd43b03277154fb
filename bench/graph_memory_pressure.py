"""Two SD-1.5 models on a GPU too small for all their graphs: txt2img through the task API, as users call it.

The runtime keeps both models (random weights, fp16, 512 px) on the device, and the tasks keep each model's
captured UNet step, decode and encode graphs with it. Each batch size captures graphs of its own, which hold
their activations. This script runs the same sequence of requests twice, alternating between the models and
batch sizes (``--sequence``):

1. with the whole GPU: the reference images, the captures, and the memory the graphs take on top of the
   weights (``graphs_held_mib``);
2. in a fresh runtime whose process is limited (``torch.cuda.set_per_process_memory_fraction``) to the
   weights, plus what the most demanding single request of the first pass needed on top of what was held
   before it (its warm-up and capture), plus ``--fraction`` of the graph memory the first pass held at its
   end: so a capture finds the GPU full once enough graphs are held. The captured
   models then release the graphs of both models and capture again (joined by the tasks across the cached
   models, :meth:`~ldm_sdk.accel.graphs.CapturedModel.release_together`).

3. again in a fresh runtime, limited to the weights plus a little more (``--evict-margin``) than the
   largest batch-1 request needed: a batch-8 capture then finds the GPU full even after releasing every
   graph, and the task evicts the other model from the runtime's cache
   (:meth:`~ldm_sdk.runtime_cache.ModelCache.make_room`) and samples again; the evicted model is reloaded
   when a later request names it.

Reported per request: the wall time, whether it ran, the captures, graph releases and model evictions it
caused (a model evicted takes its captures' counters with it), the models resident after it, and whether
its images equal the first pass's bit for bit.

    python bench/graph_memory_pressure.py --steps 10 --out bench/results/graph_memory_pressure_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.benchmarks import tasks as bench_tasks
from ldm_sdk.benchmarks.random_models import random_model_file
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks.base import TaskRequest, parse_request
from ldm_sdk.tasks.context import CAPTURED_DECODER, CAPTURED_ENCODER, CAPTURED_MODEL, load_bundle

MIB = 1 << 20


def settled_reserved() -> int:
    """Bytes reserved once the allocator's free blocks are returned."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def captured_models(runtime: Runtime) -> list[CapturedModel]:
    """Every captured network the runtime keeps with its resident models, the guided steps (companions)
    included. (A model evicted takes its captures, and their counters, with it.)"""
    found: list[CapturedModel] = []
    for attached in runtime.cache.resident_attachments():
        for name in (CAPTURED_MODEL, CAPTURED_DECODER, CAPTURED_ENCODER):
            captured = attached.get(name)
            if captured is not None:
                found += [captured, *captured.companions.values()]
    return found


def counters(runtime: Runtime) -> dict[str, int]:
    models = captured_models(runtime)
    return {
        "captures": sum(m.stats.captures for m in models),
        "memory_releases": sum(m.stats.memory_releases for m in models),
        "graphs_held": sum(len(m.signatures) for m in models),
        "evictions": runtime.cache.stats().evictions,
    }


def run_pass(
    files: list[str], sequence: list[tuple[int, int]], steps: int, fraction_bytes: int | None
) -> dict[str, Any]:
    """The requests of ``sequence`` ((model index, batch) pairs) in a fresh runtime, limited to
    ``fraction_bytes`` of device memory over both models' weights when given. No model is referenced here
    between requests, so one the runtime evicts leaves the GPU."""
    placement = {"device": "cuda", "dtype": "fp16"}

    def request(index: int) -> TaskRequest:
        return parse_request(TaskRequest, {"model": files[index], **placement})

    with Runtime.create(device="cuda", dtype="fp16") as runtime:
        for index in range(len(files)):
            load_bundle(request(index), runtime)
        weights = settled_reserved()
        total = torch.cuda.get_device_properties(0).total_memory
        if fraction_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (weights + fraction_bytes) / total))
        registry = runtime.registries.condition_encoders
        task = None
        runs: list[dict[str, Any]] = []
        try:
            for index, batch in sequence:
                common = {"model": files[index], **placement, "steps": steps, "seed": 0, "batch": batch}
                common["batch_mode"] = "together"  # one network call for the batch: a graph per batch size
                record: dict[str, Any] = {"model": index, "batch": batch}
                try:
                    bundle = load_bundle(request(index), runtime)  # reloaded here if it was evicted
                    job = bench_tasks.build_job("txt2img", bundle, registry, (512, 512), common)
                    del bundle
                    if task is None:
                        from ldm_sdk.tasks import get_task

                        task = get_task("txt2img", runtime)
                    before = counters(runtime)
                    held_before = settled_reserved()
                    torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    result = task(job.request, runtime, inputs=job.inputs)
                    torch.cuda.synchronize()
                    record["wall_s"] = time.perf_counter() - start
                    record["ok"] = True
                    pixels = b"".join(image.tobytes() for image in result.images)
                    record["images_sha256"] = hashlib.sha256(pixels).hexdigest()
                    del result
                    after = counters(runtime)
                    record |= {k: after[k] - before[k] for k in ("captures", "memory_releases", "evictions")}
                    record["graphs_held"] = after["graphs_held"]
                    record["need_mib"] = (torch.cuda.max_memory_reserved() - held_before) // MIB
                except Exception as exc:  # reported, not raised: the next requests still run
                    record["ok"] = False
                    record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                record["resident_models"] = len(runtime.cache.resident())
                record["reserved_mib"] = settled_reserved() // MIB
                runs.append(record)
                print(json.dumps(record), flush=True)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        held = settled_reserved() - weights
        return {"weights_mib": weights // MIB, "graphs_held_mib": held // MIB, "runs": runs}


def equal_images(a: dict[str, Any], b: dict[str, Any]) -> list[bool]:
    return [
        x.get("images_sha256") is not None and x.get("images_sha256") == y.get("images_sha256")
        for x, y in zip(a["runs"], b["runs"], strict=True)
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--sequence",
        default="0:1,0:8,1:1,1:8,0:1,0:8,1:4",
        help="model:batch pairs, comma-separated (models 0 and 1)",
    )
    p.add_argument(
        "--fraction", type=float, default=0.25, help="of the graph memory the first pass held at its end"
    )
    p.add_argument(
        "--evict-margin",
        type=float,
        default=1.1,
        help="the third pass's limit over the weights: this times the largest batch-1 request's need",
    )
    p.add_argument("--random-dir", help="where to write / reuse the random models (default: a temp dir)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    sequence = [(int(m), int(b)) for m, b in (pair.split(":") for pair in args.sequence.split(","))]
    with contextlib.ExitStack() as stack:
        folder = args.random_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ldm-sdk-"))
        files = [str(random_model_file("sd15", folder, seed=seed)) for seed in (0, 1)]
        free = run_pass(files, sequence, args.steps, None)
        need = max(r["need_mib"] for r in free["runs"])
        limit = (need + int(free["graphs_held_mib"] * args.fraction)) * MIB
        limited = run_pass(files, sequence, args.steps, limit)
        # room for a batch-1 request beside both models, not for a batch-8 one: only an eviction makes room
        need_one = max(r["need_mib"] for r in free["runs"] if r["batch"] == 1)
        tight = int(need_one * args.evict_margin) * MIB
        evicting = run_pass(files, sequence, args.steps, tight)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "steps": args.steps,
        "sequence": args.sequence,
        "graphs_held_mib": free["graphs_held_mib"],
        "largest_need_mib": need,
        "fraction": args.fraction,
        "limit_over_weights_mib": limit // MIB,
        "largest_batch1_need_mib": need_one,
        "evicting_limit_over_weights_mib": tight // MIB,
        "whole_gpu": free,
        "limited": limited,
        "evicting": evicting,
        "all_ran": all(r["ok"] for r in limited["runs"]),
        "images_equal": equal_images(free, limited),
        "evicting_all_ran": all(r["ok"] for r in evicting["runs"]),
        "evicting_images_equal": equal_images(free, evicting),
    }
    print(
        json.dumps(
            {k: v for k, v in report.items() if k not in ("whole_gpu", "limited", "evicting")}, indent=1
        )
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
