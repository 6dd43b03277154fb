"""Does an fp32 CPU model gain from the CPU fast path's exact K/V cache, or from channels_last?

    python bench/probe_cpu_fp32_options.py --random-model sd15-ci --out probe_cpu_fp32_options.json

Four copies of one model (``--random-model``, written into ``--random-dir``) are loaded in fp32 on the CPU:
as loaded, with the cross-attention K/V cache (:func:`ldm_sdk.accel.kv_cache.cache_context_projections`),
with channels_last weights, and with both (:func:`ldm_sdk.accel.cpu.configure_cpu_inference` with
``dtype="fp32"``, no prepacking, torch's threads left alone). Measured in ``--rounds`` rounds in one
process, each round giving every variant a block of its own, so that a change in the machine's load hits
every variant alike. Each block starts with an untimed call: switching between NCHW and channels_last
models makes oneDNN build its kernels again, which interleaving call by call would charge to every call.

- ``txt2img``: the task end to end (``--steps`` DDIM steps, the model's size), one timed run per block; the
  final latent's largest difference from the plain model's;
- ``unet``: one guided UNet call (batch 2, a random context), ``--calls`` timed calls per block; whether the
  output equals the plain model's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sdk import load
from ldm_sdk.accel.cpu import configure_cpu_inference
from ldm_sdk.benchmarks import tasks as bench_tasks
from ldm_sdk.benchmarks.random_models import RANDOM_MODELS, random_model_file
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import TaskInputs, Txt2ImgRequest
from ldm_sdk.tasks.context import default_size

#: name -> (channels_last, K/V cache)
VARIANTS = {
    "plain": (False, False),
    "kv_cache": (False, True),
    "channels_last": (True, False),
    "both": (True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default="sd15-ci")
    parser.add_argument("--random-dir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = args.random_dir or tempfile.mkdtemp(prefix="ldm-sdk-")
    path = random_model_file(args.random_model, folder, seed=0)
    models = {}
    for name, (channels_last, kv) in VARIANTS.items():
        bundle = load(path, device="cpu", dtype=torch.float32).eval()
        if channels_last or kv:
            networks = (bundle.model, bundle.first_stage_model)
            configure_cpu_inference(
                *networks, dtype="fp32", channels_last=channels_last, cache_kv=kv, threads=0, prepack=False
            )
        models[name] = bundle
    height, width = default_size(models["plain"])
    request = Txt2ImgRequest(prompt=bench_tasks.PROMPT, steps=args.steps, width=width, height=height)
    task = get_task("txt2img")
    task_s: dict[str, list[float]] = {k: [] for k in models}
    latents = {}
    with Runtime.create(device="cpu", dtype="fp32") as runtime:
        for _ in range(args.rounds):
            for name, bundle in models.items():
                for timed in (False, True):
                    t0 = time.perf_counter()
                    result = task(request, runtime, inputs=TaskInputs(bundle=bundle))
                    if timed:
                        task_s[name].append(time.perf_counter() - t0)
                latents[name] = result.latents
    g = torch.Generator().manual_seed(0)
    f = models["plain"].downsampling_factor
    x = torch.randn(2, 4, height // f, width // f, generator=g)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, generator=g)
    unet_s: dict[str, list[float]] = {k: [] for k in models}
    outs = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, bundle in models.items():
                unet = bundle.model.diffusion_model
                xin = x.contiguous(memory_format=torch.channels_last) if VARIANTS[name][0] else x
                outs[name] = unet(xin, t, context=context)
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    unet(xin, t, context=context)
                    unet_s[name].append(time.perf_counter() - t0)
    report = {
        "model": args.random_model,
        "size": [height, width],
        "steps": args.steps,
        "env": bench_tasks.environment(torch.device("cpu")),
        "variants": {
            name: {
                "txt2img_s": task_s[name],
                "txt2img_median_s": statistics.median(task_s[name]),
                "latent_max_abs_diff_vs_plain": float((latents[name] - latents["plain"]).abs().max()),
                "unet_call_s": unet_s[name],
                "unet_call_median_s": statistics.median(unet_s[name]),
                "unet_bit_identical_to_plain": bool(torch.equal(outs[name], outs["plain"])),
            }
            for name in models
        },
    }
    for name, v in report["variants"].items():
        print(
            f"{name:14s} txt2img {v['txt2img_median_s']:.3f} s, unet call "
            f"{v['unet_call_median_s'] * 1e3:.1f} ms, latent diff {v['latent_max_abs_diff_vs_plain']:.2e}, "
            f"unet bit-identical {v['unet_bit_identical_to_plain']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
