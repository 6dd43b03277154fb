"""Where the GPU memory of a first guided step goes: SD-1.5 (random weights, fp16, prepared as the runtime
does) at 512 px, ``--batch`` images with classifier-free guidance, as the tasks run it (the whole guided step
captured, the halves sharing their input).

The captured function is called in order: once to record its Triton launches (pre-compilation), ``warmup``
times eagerly on a side stream, once under capture; then the graph replays. Each of those calls is wrapped
to report the peak memory allocated and reserved during it, and what stays allocated after it. Also: the
model's own memory, the memory the graphs hold afterwards (the allocator's free blocks returned), and the
same step run eagerly (no graph) for comparison.

    python bench/capture_memory.py --batch 8 --out bench/results/capture_memory_b8_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guided_tail import guided_setup

from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.guided_step import guided_denoiser
from ldm_sdk.diffusion.conditioning import bind_unet
from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule

MIB = 1 << 20


def mib(n: int) -> int:
    return n // MIB


def settled() -> dict[str, int]:
    """Allocated and reserved now, the allocator's free blocks returned first (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return {"allocated": mib(torch.cuda.memory_allocated()), "reserved": mib(torch.cuda.memory_reserved())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    setup = guided_setup(dev, args.batch)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
    }
    res["model"] = settled()
    step = setup.den.captured  # the guided step's CapturedModel (a companion of the UNet's)
    calls: list[dict[str, int]] = []
    inner = step.fn

    def measured(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        # the allocator's counters are the host's: no synchronisation needed (nor allowed under capture)
        torch.cuda.reset_peak_memory_stats()
        out = inner(x, t, cond)
        calls.append(
            {
                "peak_allocated": mib(torch.cuda.max_memory_allocated()),
                "peak_reserved": mib(torch.cuda.max_memory_reserved()),
                "allocated_after": mib(torch.cuda.memory_allocated()),
            }
        )
        return out

    step.fn = measured
    t = torch.full((args.batch,), 501.0, dtype=torch.float64, device=dev)
    with torch.inference_mode():
        torch.cuda.reset_peak_memory_stats()
        setup.den(setup.noise.float(), t)
        torch.cuda.synchronize()
        res["first_call_peak"] = {
            "allocated": mib(torch.cuda.max_memory_allocated()),
            "reserved": mib(torch.cuda.max_memory_reserved()),
        }
        res["fn_calls"] = calls  # record (pre-compilation), warm-ups, capture
        res["after_capture"] = settled()
        # the same step eagerly: a CapturedModel in mode "off" over the same network
        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, 0.00085, 0.012)).to(dev)
        off = CapturedModel(bind_unet(setup.unet, "crossattn"), mode="off", modules=[setup.unet])
        eager = guided_denoiser(off, sched, "eps", setup.cond, setup.uncond, 7.5, share_input=True)
        torch.cuda.reset_peak_memory_stats()
        eager(setup.noise.float(), t)
        torch.cuda.synchronize()
        res["eager_peak"] = {
            "allocated": mib(torch.cuda.max_memory_allocated()),
            "reserved": mib(torch.cuda.max_memory_reserved()),
        }
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
