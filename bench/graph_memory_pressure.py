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

Reported per request: the wall time, whether it ran, the captures and releases it caused, and whether its
images equal the first pass's bit for bit.

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


def captured_models(runtime: Runtime, bundles: list[Any]) -> list[CapturedModel]:
    """Every captured network the runtime keeps with ``bundles``, the guided steps (companions) included."""
    found: list[CapturedModel] = []
    for bundle in bundles:
        attached = runtime.cache.attachments(bundle)
        for name in (CAPTURED_MODEL, CAPTURED_DECODER, CAPTURED_ENCODER):
            captured = attached.get(name)
            if captured is not None:
                found += [captured, *captured.companions.values()]
    return found


def counters(models: list[CapturedModel]) -> dict[str, int]:
    return {
        "captures": sum(m.stats.captures for m in models),
        "memory_releases": sum(m.stats.memory_releases for m in models),
        "graphs_held": sum(len(m.signatures) for m in models),
    }


def run_pass(
    files: list[str], sequence: list[tuple[int, int]], steps: int, fraction_bytes: int | None
) -> dict[str, Any]:
    """The requests of ``sequence`` ((model index, batch) pairs) in a fresh runtime, limited to
    ``fraction_bytes`` of device memory when given."""
    with Runtime.create(device="cuda", dtype="fp16") as runtime:
        placement = {"device": "cuda", "dtype": "fp16"}
        bundles = [load_bundle(parse_request(TaskRequest, {"model": f, **placement}), runtime) for f in files]
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
                job = bench_tasks.build_job("txt2img", bundles[index], registry, (512, 512), common)
                if task is None:
                    from ldm_sdk.tasks import get_task

                    task = get_task("txt2img", runtime)
                before = counters(captured_models(runtime, bundles))
                held_before = settled_reserved()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                record: dict[str, Any] = {"model": index, "batch": batch}
                try:
                    result = task(job.request, runtime, inputs=job.inputs)
                    torch.cuda.synchronize()
                    record["ok"] = True
                    pixels = b"".join(image.tobytes() for image in result.images)
                    record["images_sha256"] = hashlib.sha256(pixels).hexdigest()
                except Exception as exc:  # reported, not raised: the next requests still run
                    record["ok"] = False
                    record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                record["wall_s"] = time.perf_counter() - start
                after = counters(captured_models(runtime, bundles))
                record |= {k: after[k] - before[k] for k in ("captures", "memory_releases")}
                record["graphs_held"] = after["graphs_held"]
                record["need_mib"] = (torch.cuda.max_memory_reserved() - held_before) // MIB
                record["reserved_mib"] = settled_reserved() // MIB
                runs.append(record)
                print(json.dumps(record), flush=True)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        held = settled_reserved() - weights
        return {"weights_mib": weights // MIB, "graphs_held_mib": held // MIB, "runs": runs}


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
    same = [
        a.get("images_sha256") is not None and a.get("images_sha256") == b.get("images_sha256")
        for a, b in zip(free["runs"], limited["runs"], strict=True)
    ]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "steps": args.steps,
        "sequence": args.sequence,
        "graphs_held_mib": free["graphs_held_mib"],
        "largest_need_mib": need,
        "fraction": args.fraction,
        "limit_over_weights_mib": limit // MIB,
        "whole_gpu": free,
        "limited": limited,
        "all_ran": all(r["ok"] for r in limited["runs"]),
        "images_equal": same,
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("whole_gpu", "limited")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
