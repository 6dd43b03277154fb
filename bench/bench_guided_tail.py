"""What a guided sampler step costs beyond the UNet, and what the fused guidance + ``(eps, x0)`` kernel
(``ldm_sdk.accel.guided_combine``) saves: SD-1.5 UNet (random weights, fp16, prepared as the runtime does)
at 512 px, batch 1 (``--batch``) with classifier-free guidance, as the tasks run it (``guided_denoiser``
with the shared input, one CUDA graph per step).

Per variant (``fused``: the one kernel; ``torch``: the ~30 torch ops it replaces), in ``--rounds``
alternating rounds: ``step_graph_ms`` -- one replay of the whole captured guided step (median of
``--iters`` CUDA-event timings); ``sample_50_s`` -- a 50-step DDIM run (eta 0) through the sampler, wall
time between synchronisations (what a user waits for, minus the decode). Also ``unet_graph_ms``: the UNet
call alone in the same guided form, captured the same way, so the step's tail is
``step_graph_ms - unet_graph_ms``. Since the cross-attentions' K / V projection of the prompts runs in a
graph of its own once per request (``ldm_sdk.accel.cond_prologue``), ``step_graph_ms`` leaves it out
where it applies; ``sample_50_s`` includes it.

    python bench/bench_guided_tail.py --out bench/results/guided_tail_h100.json
    python bench/bench_guided_tail.py --batch 8 --variants fused --out guided_tail_b8.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.guided_step import GuidedGraphDenoiser, guided_denoiser
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
from ldm_sdk.samplers.ddim import sample as ddim_sample


def graph_ms(captured: CapturedModel, iters: int) -> float:
    capture = next(iter(captured._captures.values()))
    assert capture.graph is not None
    return C.median(C.time_calls(capture.graph.replay, torch.device("cuda"), warmup=3, iters=iters)) * 1e3


@dataclass
class GuidedSetup:
    """The SD-1.5 UNet prepared and bound as the tasks bind it, its companion guided denoiser for the image
    batch (guidance 7.5, shared input), the starting noise, the prompt / negative conditionings and the
    UNet itself."""

    captured: CapturedModel
    den: GuidedGraphDenoiser
    noise: torch.Tensor
    cond: Conditioning
    uncond: Conditioning
    unet: torch.nn.Module


def guided_setup(dev: torch.device, batch: int = 1) -> GuidedSetup:
    """Random weights (seeded), fp16, :func:`prepare_cuda_inference`, ``batch`` images; the shared setup of
    this script and ``bench/profile_guided_step.py``."""
    unet = C.random_sd15_unet(dev).half()
    prepare_cuda_inference(unet)
    captured = CapturedModel(bind_unet(unet, "crossattn"), modules=[unet])
    sched = DiffusionSchedule(make_beta_schedule("linear", 1000, 0.00085, 0.012)).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    noise = torch.randn(batch, 4, 64, 64, generator=g, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    cond = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=dev).half())
    uncond = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=dev).half())
    den = guided_denoiser(captured, sched, "eps", cond, uncond, 7.5, share_input=True)
    return GuidedSetup(captured, den, noise, cond, uncond, unet)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=1, help="timed sampling runs per round and variant")
    p.add_argument("--batch", type=int, default=1, help="images sampled together (the UNet runs 2x that)")
    p.add_argument(
        "--variants", nargs="+", choices=("fused", "torch"), default=["fused", "torch"], help="tails to time"
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    setup = guided_setup(dev, args.batch)
    captured, den, noise, cond, uncond = setup.captured, setup.den, setup.noise, setup.cond, setup.uncond
    step = den.captured.fn  # the GuidedPrediction the companion graph captures
    ts = torch.tensor(C.timesteps(args.steps), dtype=torch.float64)
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": args.batch,
        "variants": {},
    }
    with torch.inference_mode():
        # the UNet alone in the guided form: x once, the [uncond; cond] context
        x = noise.float()
        c2 = Conditioning.cat(uncond.expand(args.batch), cond.expand(args.batch))
        captured(x, torch.full((args.batch,), 501.0, dtype=torch.float64, device=dev), c2)
        res["unet_graph_ms"] = graph_ms(captured, args.iters)
        for _ in range(args.rounds):
            for name in args.variants:
                fuse = name == "fused"
                step.fuse_tail = fuse
                den.captured.clear()
                ddim_sample(den, noise, ts, eta=0.0)  # captures
                row = res["variants"].setdefault(name, {"step_graph_ms": [], "sample_s": []})
                row["step_graph_ms"].append(round(graph_ms(den.captured, args.iters), 4))
                for _ in range(args.samples):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    latents = ddim_sample(den, noise, ts, eta=0.0)
                    torch.cuda.synchronize()
                    row["sample_s"].append(round(time.perf_counter() - start, 5))
                row.setdefault("latents", latents)
                print(name, row["step_graph_ms"][-1], row["sample_s"][-1], flush=True)
    rows = res["variants"]
    latents = {name: row.pop("latents") for name, row in rows.items()}
    if len(latents) == 2:
        res["latents_max_abs_diff"] = float((latents["fused"] - latents["torch"]).abs().max())
    for row in rows.values():
        row["step_graph_ms_median"] = C.median(row["step_graph_ms"])
        row["sample_s_median"] = C.median(row["sample_s"])
        row["tail_ms"] = row["step_graph_ms_median"] - res["unet_graph_ms"]
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
