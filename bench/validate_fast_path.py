"""GPU validation of the fast path, in one run (about a minute on an H100; no diffusers needed).

    PYTHONPATH=/tmp/site python bench/validate_fast_path.py --out fast_path_h100.json

1. Runs the GPU tests of the fast path (``pytest -m gpu tests/accel``; where pytest is missing, the same
   checks from ``tests/accel/capture_checks.py`` are called directly).
2. SD-1.5 UNet step, fp16, batch 2 (one guidance step at batch 1), the call the sampler makes (float32
   latents, float64 timesteps, fp16 context): eager vs CUDA-graph replay through ``CapturedModel``
   (GroupNorm32 keeps CompVis' float32 round trip: torch's native half-precision group_norm was measured
   on an H100 to be far outside one rounding of the float32 result, see docs/performance-log.md).
3. End to end, batch 1, 512 px: 50 DDIM steps with classifier-free guidance 7.5 through the SDK sampler
   (``ModelDenoiser(ClassifierFreeGuidance(...))``), then the kl-f8 VAE decode; eager vs captured, and the
   relative error of the captured latents / image against the eager ones.

Random weights (ldm_sdk.benchmarks.common.randomize_), as in the sampling benchmark. Exit status 1 if a
test fails or
the captured image differs from the eager one by more than 1e-2 (relative).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(ROOT / "bench")):  # the package from this checkout; sibling scripts
    if extra not in sys.path:
        sys.path.insert(0, extra)

import torch  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[validate {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# -- 1. tests ------------------------------------------------------------------------------------------------
def run_tests() -> dict[str, Any]:
    env = dict(os.environ)
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if importlib.util.find_spec("pytest") is not None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/accel", "-p", "no:cacheprovider"]
        log("running " + " ".join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        tail = (proc.stdout + proc.stderr).strip().splitlines()
        print("\n".join(tail[-40:]), flush=True)
        return {"runner": "pytest", "returncode": proc.returncode, "passed": proc.returncode == 0}
    log("pytest is not installed: calling the checks of tests/accel/capture_checks.py directly")
    return run_checks_directly()


def load_checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capture_checks", ROOT / "tests/accel/capture_checks.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load tests/accel/capture_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_checks"] = module
    spec.loader.exec_module(module)
    return module


def run_checks_directly(dry_run: bool = False) -> dict[str, Any]:
    """The checks of test_gpu.py without pytest; ``dry_run``: on the CPU with emulated capture."""
    cc = load_checks()
    if dry_run:
        device, mode, dtypes = torch.device("cpu"), "emulate", [torch.float32, torch.bfloat16]
    else:
        device, mode = torch.device("cuda"), "graph"
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    cases: list[tuple[str, Any]] = [
        (f"unet_capture[{f},{d}]", lambda f=f, d=d: cc.check_unet_capture(device, d, mode, f))
        for f in cc.FAMILIES
        for d in dtypes
    ]
    cases += [
        (f"ddim_cfg_capture[{d}]", lambda d=d: cc.check_sampler_capture(device, d, mode)) for d in dtypes
    ]
    cases += [(f"cache_and_outputs[{mode}]", lambda: cc.check_cache_and_outputs(device, mode))]
    if not dry_run:
        cases += [
            ("cache_and_outputs[auto]", lambda: cc.check_cache_and_outputs(device, "auto")),
            ("refusals", lambda: cc.check_capture_refusals(device)),
        ]
    failures = []
    for name, case in cases:
        try:
            result = case()
            print(f"PASS {name} {result if result else ''}", flush=True)
        except Exception as exc:  # report every failing check, then fail the run
            failures.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{len(cases) - len(failures)} passed, {len(failures)} failed", flush=True)
    return {"runner": "direct", "failed": failures, "passed": not failures}


# -- 2./3. SD-1.5 timings -----------------------------------------------------------------------------
def median_ms(fn: Any, device: torch.device, iters: int, warmup: int = 3) -> float:
    from ldm_sdk.benchmarks import common as C

    return 1e3 * C.median(C.time_calls(fn, device, warmup, iters))


def build_sd15(arch: Any, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Any, Any]:
    from ldm_sdk.benchmarks import common as C
    from ldm_sdk.models.configs import UNetConfig
    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.unet import UNetModel
    from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

    fs = FIRST_STAGE_ZOO[arch.first_stage]
    if arch.vae_ch is not None:  # the --cpu-dry-run size
        fs = fs.model_copy(update={"ddconfig": fs.ddconfig.model_copy(update={"ch": arch.vae_ch})})
    with torch.device("meta"):
        unet = UNetModel.from_config(UNetConfig(**arch.unet))
        vae = AutoencoderKL.from_config(fs)  # type: ignore[arg-type]
    gen = torch.Generator(device).manual_seed(seed)
    unet, vae = unet.to_empty(device=device), vae.to_empty(device=device)
    C.randomize_(unet, gen)
    C.randomize_(vae, gen)
    unet.to(dtype).eval().requires_grad_(False)
    vae.to(dtype).eval().requires_grad_(False)
    return unet, vae


def timings(args: argparse.Namespace) -> dict[str, Any]:
    from ldm_sdk.accel import CapturedModel
    from ldm_sdk.benchmarks import common as C
    from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
    from ldm_sdk.diffusion.denoiser import ModelDenoiser
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers.ddim import sample as ddim_sample

    if args.cpu_dry_run:  # the script's logic on the CPU: small UNet, bf16, emulated capture
        device, dtype, mode, arch = torch.device("cpu"), torch.bfloat16, "emulate", C.small(C.ARCHS["sd15"])
    else:
        device, dtype, mode, arch = torch.device("cuda"), torch.float16, "graph", C.ARCHS["sd15"]
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    unet, vae = build_sd15(arch, device, dtype, args.seed)
    log(f"SD-1.5 UNet + kl-f8 VAE built (random weights, {dtype}, {arch.image_px} px)")
    res: dict[str, Any] = {}
    model_fn = bind_unet(unet, "crossattn")
    g = torch.Generator(device).manual_seed(args.seed + 1)
    lat = arch.image_px // 8
    x = torch.randn(2, 4, lat, lat, generator=g, device=device)  # the sampler keeps float32 latents
    t = torch.tensor([981.0, 981.0], dtype=torch.float64, device=device)  # time_batch: float64
    ctx = torch.randn(2, 77, 768, generator=g, device=device).to(dtype)
    cond = Conditioning(crossattn=ctx)

    with torch.inference_mode():
        # -- UNet step ------------------------------------------------------------------------------
        captured = CapturedModel(model_fn, mode=mode, modules=[unet])
        eager_out = model_fn(x, t, cond)
        captured_out = captured(x, t, cond)
        res["unet_step_eager_ms"] = median_ms(lambda: model_fn(x, t, cond), device, args.iters)
        res["unet_step_captured_ms"] = median_ms(lambda: captured(x, t, cond), device, args.iters)
        res["unet_step_captured_rel_err"] = C.rel_err(captured_out, eager_out)
        del captured
        log(
            f"UNet step b2 {dtype}: eager {res['unet_step_eager_ms']:.2f} ms, "
            f"captured {res['unet_step_captured_ms']:.2f} ms"
        )

        # -- end to end -----------------------------------------------------------------------------
        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))
        noise = torch.randn(1, 4, lat, lat, generator=g, device=device)
        c1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))
        u1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))
        captured = CapturedModel(model_fn, mode=mode, modules=[unet])

        def image(fn: Any, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
            den = ModelDenoiser(ClassifierFreeGuidance(fn, args.guidance, u1), sched, "eps", cond=c1)
            latents = ddim_sample(den, noise, torch.tensor(C.timesteps(steps), dtype=torch.float64))
            return latents, vae.decode((latents / arch.scale_factor).to(dtype))

        for fn in (model_fn, captured):  # warm-up (and the capture)
            image(fn, 2)
        runs: dict[str, list[float]] = {"eager": [], "captured": []}
        outs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for _ in range(args.e2e_repeats):  # interleaved
            for name, fn in (("eager", model_fn), ("captured", captured)):
                secs, outs[name] = C.wall(lambda fn=fn: image(fn, args.steps), device)
                runs[name].append(secs)
        for name in runs:
            res[f"e2e_b1_{name}_s"] = C.median(runs[name])
            res[f"e2e_b1_{name}_runs_s"] = runs[name]
        res["e2e_b1_speedup"] = res["e2e_b1_eager_s"] / res["e2e_b1_captured_s"]
        res["e2e_latents_rel_err"] = C.rel_err(outs["captured"][0], outs["eager"][0])
        res["e2e_image_rel_err"] = C.rel_err(outs["captured"][1], outs["eager"][1])
        res["e2e_image_finite"] = bool(torch.isfinite(outs["captured"][1]).all())
        res["captures"] = captured.stats.captures
        res["replays"] = captured.stats.replays
        if device.type == "cuda":
            res["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    log(
        f"e2e b1 {args.steps} steps + decode: eager {res['e2e_b1_eager_s']:.3f} s, captured "
        f"{res['e2e_b1_captured_s']:.3f} s ({res['e2e_b1_speedup']:.2f}x); captured vs eager rel. err: "
        f"latents {res['e2e_latents_rel_err']:.2e}, image {res['e2e_image_rel_err']:.2e}"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--iters", type=int, default=30, help="timed UNet calls per variant")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-cudnn-benchmark",
        dest="cudnn_benchmark",
        action="store_false",
        help="leave torch.backends.cudnn.benchmark off (bench/profile_unet.py turns it on)",
    )
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="exercise this script on the CPU: the checks without pytest, small UNet, bf16, emulated "
        "capture (timings mean nothing)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("validate_fast_path.py needs a CUDA device (or --cpu-dry-run)", file=sys.stderr)
        return 2
    from ldm_sdk.benchmarks import common as C

    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_name": C.cpu_name() + " (CPU DRY RUN)" if args.cpu_dry_run else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cudnn_benchmark": args.cudnn_benchmark,
    }
    log(json.dumps(env))
    results: dict[str, Any] = {"env": env}
    if args.skip_tests:
        results["tests"] = {"skipped": True}
    else:
        results["tests"] = run_checks_directly(dry_run=True) if args.cpu_dry_run else run_tests()
    results["timings"] = timings(args)
    tm = results["timings"]
    print(f"\n== fast path, SD-1.5{' (small)' if args.cpu_dry_run else ''}, " + env["device_name"])
    eager_ms, captured_ms = tm["unet_step_eager_ms"], tm["unet_step_captured_ms"]
    print(f"UNet step b2, eager {eager_ms:.2f} ms, captured {captured_ms:.2f} ms")
    print(f"captured vs eager, one step: rel. err {tm['unet_step_captured_rel_err']:.2e}")
    print(
        f"e2e batch 1, {args.steps} DDIM steps + CFG {args.guidance} + VAE decode: eager "
        f"{tm['e2e_b1_eager_s']:.3f} s, captured {tm['e2e_b1_captured_s']:.3f} s "
        f"-> {tm['e2e_b1_speedup']:.2f}x"
    )
    print(
        f"captured vs eager after {args.steps} steps: latents rel. err {tm['e2e_latents_rel_err']:.2e}, "
        f"image rel. err {tm['e2e_image_rel_err']:.2e} (finite: {tm['e2e_image_finite']})"
    )
    tests = results["tests"]
    print(f"tests: {'skipped' if tests.get('skipped') else ('passed' if tests['passed'] else 'FAILED')}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    ok = (
        (tests.get("skipped") or tests["passed"])
        and tm["e2e_image_rel_err"] <= 1e-2
        and tm["e2e_image_finite"]
    )
    log("done" + ("" if ok else ": FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
