"""Which Triton kernel variants the first image compiles, and what each costs to compile.

    python bench/kernel_variants.py --out bench/results/kernel_variants_h100.json     # on a CUDA machine

Records the fused kernels' launches (``ldm_sdk.accel.precompile.record_launches``) of the SD-1.5 UNet's
first-step call (batch 1 with guidance, the halves sharing their input, 512 px) and of the kl-f8 decode,
groups the distinct variants by kernel with the launch options and constexprs that tell them apart, then
compiles every variant one after another in a single compile worker (``ldm_sdk.kernels.compile_workers``,
empty Triton cache) to time each. The sum is the compile work of a cold first image; the per-kernel counts
say where fewer variants would save it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(ROOT / "bench")):
    if extra not in sys.path:
        sys.path.insert(0, extra)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_variants_")
    import torch
    from validate_fast_path import build_sd15

    from ldm_sdk.accel.precompile import _spec, record_launches, worker_jobs
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.benchmarks import common as C
    from ldm_sdk.kernels.compile_workers import CompileWorkers

    device, dtype = torch.device("cuda"), torch.float16
    unet, vae = build_sd15(C.ARCHS["sd15"], device, dtype, 0)
    for m in (unet, vae):
        prepare_cuda_inference(m)
    x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t = torch.full((1,), 501.0, device=device)
    ctx = torch.randn(2, 77, 768, device=device, dtype=dtype)
    z = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "models": {}}
    for name, modules, call in (
        ("unet", [unet], lambda: unet(x, t, context=ctx)),
        ("decoder", [vae], lambda: vae.decode(z)),
    ):
        unique, launches, _ = record_launches(modules, call)
        jobs, left = worker_jobs(unique)
        by_kernel: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with CompileWorkers(1) as workers:
            for job in jobs:
                workers.submit(job)
            times = {r.job: (r.compile_s, r.launcher_s, r.ok) for r in workers.results()}
        for job, launch in jobs.items():
            compile_s, launcher_s, ok = times[job]
            by_kernel[job.name].append(
                {
                    "kwargs": {k: repr(v) for k, v in sorted(launch.kwargs.items())},
                    "args": [repr(_spec(a)) for a in launch.args],
                    "compile_s": round(compile_s, 3),
                    "launcher_s": round(launcher_s, 3),
                    "ok": ok,
                }
            )
        summary = {
            k: {"variants": len(v), "compile_s": round(sum(r["compile_s"] + r["launcher_s"] for r in v), 2)}
            for k, v in sorted(by_kernel.items(), key=lambda kv: -sum(r["compile_s"] for r in kv[1]))
        }
        out["models"][name] = {
            "launches": launches,
            "variants": len(unique),
            "not_sent": len(left),
            "summary": summary,
            "kernels": by_kernel,
        }
        print(name, launches, "launches", len(unique), "variants", flush=True)
        for k, v in summary.items():
            print(f"  {k:34s} {v['variants']:3d} variants {v['compile_s']:6.2f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
