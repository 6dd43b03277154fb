"""Every GPU kernel of the guided sampler step as the tasks run it, per step, by name: the SD-1.5 UNet
(random weights, fp16, prepared as the runtime does) at 512 px, image batch 1 with classifier-free guidance
through :func:`~ldm_sdk.accel.guided_step.guided_denoiser` (the input shared by the halves, one CUDA graph
per step) and DDIM's eager update, profiled over a ``--steps``-step run after two warm-up runs.

Kernels are grouped as ``ours`` (the package's Triton kernels), ``library`` (cuDNN, cuBLAS and their
helpers) and ``torch`` (torch's own elementwise, copy, concatenation and fill kernels, and memory copies):
the last group is what a fused path can still take over, so each of its kernels is listed with its launches
and microseconds per step.

    python bench/profile_guided_step.py --out bench/results/profile_guided_step_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_guided_tail import guided_setup

from ldm_sdk.benchmarks import common as C
from ldm_sdk.samplers.ddim import sample as ddim_sample

#: kernel-name fragments of the libraries' kernels
LIBRARY = ("cudnn", "xmma", "nvjet", "cublas", "cutlass", "sm90_", "sm80_", "splitK", "gemm", "flash")


def group(name: str) -> str:
    """``ours`` / ``library`` / ``torch`` for a kernel name (Triton kernels are the package's ``_...``)."""
    if any(part in name for part in LIBRARY):
        return "library"
    if name.startswith("_"):
        return "ours"
    return "torch"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this profile needs a CUDA device")
    setup = guided_setup(torch.device("cuda"))
    den, noise = setup.den, setup.noise
    ts = torch.tensor(C.timesteps(args.steps), dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(2):  # capture, then a warm run
            ddim_sample(den, noise, ts, eta=0.0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ddim_sample(den, noise, ts, eta=0.0)
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time_total
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["steps"] = args.steps
    per_group: dict[str, dict[str, float]] = defaultdict(lambda: {"launches": 0.0, "us": 0.0})
    listed = []
    for name, (count, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        row = per_group[group(name)]
        row["launches"] += count / args.steps
        row["us"] += us / args.steps
        if group(name) == "torch":
            listed.append({"kernel": name, "launches": count / args.steps, "us": round(us / args.steps, 2)})
    res["per_step"] = {
        k: {"launches": round(v["launches"], 1), "us": round(v["us"], 1)} for k, v in per_group.items()
    }
    res["torch_kernels_per_step"] = listed
    print(json.dumps(res["per_step"]))
    for row in listed:
        print(f"{row['launches']:5.1f}x {row['us']:8.1f} us  {row['kernel'][:140]}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
