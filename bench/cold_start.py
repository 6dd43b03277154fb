"""Where the time to the first image goes after loading a model: each phase of a fresh process, timed.

    python bench/cold_start.py --out cold_start.json        # on a CUDA machine

Each variant runs in its own fresh process (CUDA, cuDNN and cuBLAS start cold) with an empty Triton cache
unless said otherwise:

* ``fused_cold``: what the runtime does (``prepare_cuda_inference``: fused kernels, channels_last), Triton
  kernels compiled from nothing;
* ``fused_warm_cache``: the same in a second process that finds ``fused_cold``'s Triton cache (what a user
  sees from the second start on);
* ``unfused``: no fused kernels (no Triton compilation), channels_last: the library kernels' own start-up;
* ``fused_no_ahead_cold`` (with ``--no-ahead``): as ``fused_cold`` without the decoder's kernels compiled
  in the background during sampling (``ldm_sdk.accel.compile_ahead``), before and after the others.

Phases (seconds): ``cuda_init`` (context), ``build`` (SD-1.5 UNet + kl-f8 VAE with random weights on the GPU,
fp16; not part of the first image), ``prepare`` (the fusion pass), ``ahead`` (the decoder's launches
recorded and sent to background compile workers, ``ldm_sdk.accel.compile_ahead``, as the task runner does
before sampling), ``first_steps`` (two guided DDIM steps
through the guided step's ``CapturedModel`` (``ldm_sdk.accel.guided_step``, as the task runner), whose
first call pre-compiles the fused kernels in parallel
(``ldm_sdk.accel.precompile``), warms up -- cuDNN / cuBLAS heuristics -- and captures the graph),
``sampling`` (a whole 50-step run from the captured graph), ``first_decode`` (the decode as the task
runner makes it: through a ``CapturedModel``, so pre-compilation, warm-up, capture and replay);
``first_image`` is the sum from ``prepare`` to ``first_decode`` (two steps more than one image).
``triton_compiled`` counts the kernels the process compiled (entries of its Triton cache),
``precompiled_*`` the variants the recording passes found, ``precompile_s_*`` the seconds their parallel
compilation took. ``--no-implicit-conv`` adds cold runs with the decoder's convolutions all cuDNN
(``ldm_sdk.accel.implicit_conv`` off), before and after the others; ``--ahead-nice N`` cold runs with the
background compile workers at nice ``N``, alternating with the default. ``--no-dual-gemm`` adds a cold run
with the GEGLU dual GEMM (``ldm_sdk.accel.geglu_gemm``) switched off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(ROOT / "bench")):
    if extra not in sys.path:
        sys.path.insert(0, extra)


def child(variant: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    from validate_fast_path import build_sd15

    from ldm_sdk.accel import CapturedModel
    from ldm_sdk.accel.guided_step import guided_denoiser
    from ldm_sdk.benchmarks import common as C
    from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers.ddim import sample as ddim_sample

    res: dict[str, Any] = {"variant": variant, "import": time.perf_counter() - t0}
    device, dtype, arch = torch.device("cuda"), torch.float16, C.ARCHS["sd15"]

    def phase(name: str, fn: Any) -> Any:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        res[name] = time.perf_counter() - start
        return out

    phase("cuda_init", lambda: torch.zeros(1, device=device))
    unet, vae = phase("build", lambda: build_sd15(arch, device, dtype, 0))
    if variant == "unfused":
        phase("prepare", lambda: [m.to(memory_format=torch.channels_last) for m in (unet, vae)])
    else:
        if variant == "fused_no_dual_gemm":  # GEGLU as cuBLAS + the gating kernel everywhere
            from ldm_sdk.accel.fusion import FusedGEGLU

            FusedGEGLU.one_gemm = False
        if variant == "fused_nice":  # the background workers at another priority (--ahead-nice)
            from ldm_sdk.accel import compile_ahead

            compile_ahead.AHEAD_NICE = int(os.environ["LDM_SDK_BENCH_AHEAD_NICE"])
        if variant == "fused_no_implicit":  # the decoder's convolutions all cuDNN (before session 10)
            from ldm_sdk.accel.block_fusion import FusedResnetBlock
            from ldm_sdk.accel.subpixel import FusedFirstStageUpsample

            FusedResnetBlock.implicit_conv = FusedFirstStageUpsample.implicit_conv = False
        from ldm_sdk.accel.prepare import prepare_cuda_inference

        phase("prepare", lambda: [prepare_cuda_inference(m) for m in (unet, vae)])
    g = torch.Generator(device).manual_seed(1)
    lat = arch.image_px // 8
    noise = torch.randn(1, 4, lat, lat, generator=g, device=device)
    c1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))
    u1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))
    model_fn = bind_unet(unet, "crossattn")
    sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))
    steps = C.timesteps(50)
    with torch.inference_mode():
        captured = CapturedModel(model_fn, mode="graph", modules=[unet])
        # as the task runner (bundle_denoiser): the whole guided step replayed from one graph, the two
        # halves sharing their input in half precision
        den = guided_denoiser(captured, sched, "eps", c1, u1, 7.5, share_input=True)
        ts = torch.tensor(steps, dtype=torch.float64)
        # as the task runner: the decoder's kernels start compiling in the background before sampling
        decoder = CapturedModel(lambda z, t, c: vae.decode(z), mode="graph", modules=[vae])
        z_like = torch.zeros(1, 4, lat, lat, device=device, dtype=dtype)
        ahead = variant not in ("unfused", "fused_no_ahead")
        res["ahead_started"] = phase(
            "ahead", lambda: ahead and decoder.compile_ahead(z_like, z_like.new_zeros(1), Conditioning())
        )
        pending = next(iter(decoder.pending_compiles.values()), None)
        # the first two steps alone: the pre-compilation of the fused kernels, warm-up and graph capture
        phase("first_steps", lambda: ddim_sample(den, noise, ts[-2:]))
        res["precompiled_unet"] = den.captured.stats.precompiled
        res["precompile_s_unet"] = den.captured.stats.precompile_s
        latents = phase("sampling", lambda: ddim_sample(den, noise, ts))
        z = (latents / arch.scale_factor).to(dtype)

        # as the task runner: the decode through a CapturedModel (pre-compilation, warm-up, capture, replay)
        image = phase("first_decode", lambda: decoder(z, z.new_zeros(1), Conditioning()))
        res["precompiled_decoder"] = decoder.stats.precompiled
        res["precompile_s_decoder"] = decoder.stats.precompile_s
        res["compiled_ahead_decoder"] = decoder.stats.compiled_ahead
        if pending is not None:  # where the main thread's "ahead" seconds went, and the workers' wall time
            report = pending.wait()
            res.update(
                ahead_record_s=report.record_s,
                ahead_spec_s=report.spec_s,
                ahead_start_s=report.start_s,
                ahead_key_s=report.key_s,
                ahead_wall_s=report.wall_s,
            )
    res["finite"] = bool(torch.isfinite(image).all())
    parts = ("prepare", "ahead", "first_steps", "sampling", "first_decode")
    res["first_image"] = sum(res[p] for p in parts)
    cache = os.environ.get("TRITON_CACHE_DIR")
    res["triton_compiled"] = (
        sum(1 for p in Path(cache).iterdir() if any(p.glob("*.cubin")))
        if cache and Path(cache).is_dir()
        else None
    )
    return res


def run_child(variant: str, cache: str, **extra_env: str) -> dict[str, Any]:
    env = {**os.environ, "TRITON_CACHE_DIR": cache, **extra_env}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant], env=env, capture_output=True, text=True, timeout=900
    )
    for line in proc.stdout.splitlines():
        if line.startswith("COLD "):
            return json.loads(line[5:])
    return {"variant": variant, "error": (proc.stdout + proc.stderr)[-3000:]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-dual-gemm", action="store_true", help="also a cold run with the GEGLU dual GEMM switched off"
    )
    p.add_argument(
        "--no-ahead",
        action="store_true",
        help="also cold runs without the decoder compiled ahead, before and after the others",
    )
    p.add_argument(
        "--no-implicit-conv",
        action="store_true",
        help="also cold runs with the decoder's convolutions all cuDNN, before and after the others",
    )
    p.add_argument(
        "--ahead-nice",
        type=int,
        default=None,
        help="also cold runs with the background workers at this nice level, alternating with the default",
    )
    args = p.parse_args(argv)
    if args.child:
        res = child(args.child)
        print("COLD " + json.dumps(res), flush=True)
        return res
    import torch

    cache = tempfile.mkdtemp(prefix="cold_triton_")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.no_ahead:
        out["fused_no_ahead_cold"] = run_child("fused_no_ahead", tempfile.mkdtemp(prefix="cold_triton_"))
    if args.no_implicit_conv:
        out["fused_no_implicit_cold"] = run_child(
            "fused_no_implicit", tempfile.mkdtemp(prefix="cold_triton_")
        )
    out["fused_cold"] = run_child("fused", cache)
    out["fused_warm_cache"] = run_child("fused", cache)
    out["unfused"] = run_child("unfused", tempfile.mkdtemp(prefix="cold_triton_"))
    if args.no_ahead:
        out["fused_no_ahead_cold_2"] = run_child("fused_no_ahead", tempfile.mkdtemp(prefix="cold_triton_"))
        out["fused_cold_2"] = run_child("fused", tempfile.mkdtemp(prefix="cold_triton_"))
    if args.no_implicit_conv:
        out["fused_no_implicit_cold_2"] = run_child(
            "fused_no_implicit", tempfile.mkdtemp(prefix="cold_triton_")
        )
        if not args.no_ahead:
            out["fused_cold_2"] = run_child("fused", tempfile.mkdtemp(prefix="cold_triton_"))
    if args.ahead_nice is not None:
        nice = {"LDM_SDK_BENCH_AHEAD_NICE": str(args.ahead_nice)}
        for i in (1, 2):
            out[f"fused_nice{args.ahead_nice}_cold_{i}"] = run_child(
                "fused_nice", tempfile.mkdtemp(prefix="cold_triton_"), **nice
            )
            out[f"fused_cold_default_nice_{i}"] = run_child("fused", tempfile.mkdtemp(prefix="cold_triton_"))
    if args.no_dual_gemm:
        out["fused_no_dual_gemm_cold"] = run_child(
            "fused_no_dual_gemm", tempfile.mkdtemp(prefix="cold_triton_")
        )
    for name in [k for k in out if k not in ("device", "torch")]:
        row = out[name]
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "error"}
        print(name, json.dumps(shown), row.get("error", ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
