"""GPU validation of the fused GroupNorm(+SiLU) / GEGLU kernels and the fusion pass, in one run (about two
to three minutes on an H100; no diffusers needed).

    PYTHONPATH=/tmp/site python bench/validate_kernels.py --out kernels_h100.json

1. Runs the GPU tests of the kernels and the pass (``pytest -m gpu tests/accel/test_triton_kernels.py
   tests/accel/test_fusion.py -p ldm_sdk.testing.pytest_plugin``; ``-p`` only where ldm-sdk is not
   installed, which registers the plugin itself) when pytest is installed.
2. Each fused op against its eager path at the SD-1.5 UNet shapes (fp16, batch 2: GroupNorm32 + SiLU with
   its float32 round trip, the SpatialTransformer's native GroupNorm, GEGLU) and the kl-f8 VAE decoder shapes
   (native fp16 GroupNorm + SiLU, NCHW and channels_last). GPU time per call, median, each variant replayed
   from a CUDA graph of several calls (the launch-free time the ops cost inside the captured UNet); the
   fused output against the float32 reference in ulps of fp16 (``compare_ulps``).
3. SD-1.5 UNet step, fp16, batch 2 (the sampler's call: float32 latents, float64 timesteps): eager,
   captured (``CapturedModel``), fused eager, fused + captured; one-step error of unfused and fused fp16
   against the float32 UNet (TF32 off).
4. End to end, batch 1, 512 px: 50 DDIM steps + CFG 7.5 + kl-f8 decode, captured vs fused + captured (UNet
   and VAE fused), interleaved; the relative error of the fused image against the unfused one, next to the
   error a one-fp16-rounding perturbation of the starting noise causes (the sampler's own sensitivity).
5. VAE decode 512x512 fp16: eager vs fused, NCHW and channels_last; error against float32.

Random weights (ldm_sdk.benchmarks.common.randomize_). Exit status 1 (and "FAILED: ..." lines) when a test
fails, a
fused kernel is outside its ulp bound, a fused network is less accurate than the unfused one against
float32 (20% margin), a result is not finite, or the fused image differs from the unfused one by more than
max(5e-2, 3 x the noise sensitivity). ``--cpu-dry-run`` exercises this script on the CPU (small sizes,
reference ops, emulated capture; numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(ROOT / "bench")):  # the package from this checkout; sibling scripts
    if extra not in sys.path:
        sys.path.insert(0, extra)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

T0 = time.perf_counter()
TEST_FILES = ("tests/accel/test_triton_kernels.py", "tests/accel/test_fusion.py")
ACCURACY_MARGIN = 1.2  # fused error vs float32 may be at most 1.2 x the unfused one (+ a floor)


def log(msg: str) -> None:
    print(f"[kernels {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


@dataclass
class Run:
    """Settings of this run and the failures found so far."""

    device: torch.device
    dtype: torch.dtype
    dry: bool
    iters: int
    failures: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        print(f"FAILED: {msg}", flush=True)

    def check_accuracy(self, what: str, err_fused: float, err_unfused: float, floor: float = 1e-4) -> None:
        if not err_fused <= ACCURACY_MARGIN * err_unfused + floor:
            self.fail(
                f"{what}: fused rel. err {err_fused:.3e} > {ACCURACY_MARGIN} x unfused {err_unfused:.3e}"
            )


# -- 1. tests ------------------------------------------------------------------------------------------------
def run_tests() -> dict[str, Any]:
    if importlib.util.find_spec("pytest") is None:
        log("pytest is not installed: skipping the GPU tests (the accuracy checks below still run)")
        return {"runner": None, "passed": True, "skipped": True}
    env = dict(os.environ)
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *TEST_FILES, *plugin_args()]
    cmd += ["-p", "no:cacheprovider", "-s"]  # -s: the tests print their measured errors
    log("running " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(lines[-60:]), flush=True)
    return {"runner": "pytest", "returncode": proc.returncode, "passed": proc.returncode == 0}


def plugin_args() -> list[str]:
    """``-p ldm_sdk.testing.pytest_plugin`` where ldm-sdk is not installed (from a checkout on PYTHONPATH);
    an installed ldm-sdk registers the plugin itself, and pytest refuses to register it twice."""
    from importlib.metadata import entry_points

    installed = any(ep.value == "ldm_sdk.testing.pytest_plugin" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "ldm_sdk.testing.pytest_plugin"]


# -- timing --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_ms(fn: Callable[[], object], run: Run, reps: int = 10) -> float:
    """Median time of one ``fn()``: on CUDA, replays of a CUDA graph of ``reps`` calls (no launch cost);
    on the CPU, wall time of eager calls."""
    from ldm_sdk.benchmarks import common as C

    if run.device.type != "cuda":
        return 1e3 * C.median(C.time_calls(fn, run.device, 1, max(2, run.iters // 10)))
    side = torch.cuda.Stream(run.device)
    side.wait_stream(torch.cuda.current_stream(run.device))
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream(run.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    try:
        return 1e3 * C.median(C.time_calls(graph.replay, run.device, 2, run.iters)) / reps
    finally:
        del graph


def median_ms(fn: Callable[[], object], run: Run) -> float:
    from ldm_sdk.benchmarks import common as C

    return 1e3 * C.median(C.time_calls(fn, run.device, 3, run.iters))


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- 2. kernels ----------------------------------------------------------------------------------------------
UNET_GN = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 960, 32, 32), (2, 1280, 16, 16), (2, 2560, 8, 8)]
TRANSFORMER_GN = [(2, 320, 64, 64), (2, 1280, 16, 16)]
VAE_GN = [(1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128), (1, 512, 64, 64)]
GEGLU_SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240), (2, 64, 10240)]


def _dry(shape: tuple[int, ...]) -> tuple[int, ...]:
    """CPU dry-run size: channels / 8 (a multiple of 32), spatial / 8."""
    if len(shape) == 3:
        return (shape[0], max(1, shape[1] // 16), shape[2] // 8)
    return (shape[0], max(32, shape[1] // 256 * 32), max(2, shape[2] // 8), max(2, shape[3] // 8))


def kernel_timings(run: Run) -> list[dict[str, Any]]:
    from ldm_sdk.accel import triton_kernels as K

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(run.device).manual_seed(0)
    dt_ = run.dtype
    size = torch.finfo(dt_).bits // 8

    def gn_inputs(shape: tuple[int, ...], cl: bool) -> tuple[Tensor, Tensor, Tensor]:
        x = (torch.randn(shape, generator=gen, device=run.device) + 0.3).to(dt_)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        w = (1 + 0.2 * torch.randn(shape[1], generator=gen, device=run.device)).to(dt_)
        b = (0.2 * torch.randn(shape[1], generator=gen, device=run.device)).to(dt_)
        return x, w, b

    Op = Callable[[], Tensor]

    def record(op: str, shape: tuple[int, ...], fmt: str, eager: Op, fused: Op, ref: Tensor, frac: float,
               traffic: int) -> None:  # fmt: skip
        with torch.inference_mode():
            out = fused()
            report = K.compare_ulps(out, ref)
            eager_ms, fused_ms = gpu_ms(eager, run), gpu_ms(fused, run)
        row = {
            "op": op, "shape": list(shape), "format": fmt, "dtype": str(dt_).removeprefix("torch."),
            "eager_ms": eager_ms, "fused_ms": fused_ms, "speedup": eager_ms / fused_ms,
            "fused_gbps": traffic / (fused_ms * 1e-3) / 1e9, "max_ulps": report.max_ulps,
            "frac_over_1ulp": report.frac_over_1ulp, "within_bound": report.within_bound,
        }  # fmt: skip
        rows.append(row)
        print(
            f"  {op:<22} {fmt:<13} {list(shape)!s:<22} eager {eager_ms:8.4f} ms  fused {fused_ms:8.4f} ms "
            f"({row['speedup']:.2f}x, {row['fused_gbps']:.0f} GB/s)  {report}",
            flush=True,
        )
        if not report.ok(frac):
            run.fail(f"{op} {fmt} {list(shape)}: fused kernel outside its ulp bound: {report}")

    shapes = {
        "unet": [_dry(s) for s in UNET_GN] if run.dry else UNET_GN,
        "transformer": [_dry(s) for s in TRANSFORMER_GN] if run.dry else TRANSFORMER_GN,
        "vae": [_dry(s) for s in VAE_GN[1:]] if run.dry else VAE_GN,
        "geglu": [_dry(s) for s in GEGLU_SHAPES] if run.dry else GEGLU_SHAPES,
    }
    log(f"kernels ({dt_}): eager vs fused, GPU time per call from CUDA-graph replays, median")
    for shape in shapes["unet"]:  # ResBlock in/out layers: GroupNorm32 (float32 round trip) + nn.SiLU
        for cl in (False, True):
            x, w, b = gn_inputs(shape, cl)
            ref = K.group_norm_act_reference(x, w, b, 32, 1e-5, "silu")
            record(
                "GroupNorm32+SiLU", shape, "channels_last" if cl else "nchw",
                lambda x=x, w=w, b=b: F.silu(
                    F.group_norm(x.float(), 32, w.float(), b.float(), 1e-5).to(x.dtype)
                ),
                lambda x=x, w=w, b=b: K.group_norm_act(x, w, b, 32, 1e-5, "silu"),
                ref, 1e-4, 3 * x.numel() * size,
            )  # fmt: skip
    for shape in shapes["transformer"]:  # SpatialTransformer.norm: native half-precision nn.GroupNorm
        x, w, b = gn_inputs(shape, False)
        ref = K.group_norm_act_reference(x, w, b, 32, 1e-6, "none")
        record(
            "GroupNorm (native)", shape, "nchw",
            lambda x=x, w=w, b=b: F.group_norm(x, 32, w, b, 1e-6),
            lambda x=x, w=w, b=b: K.group_norm_act(x, w, b, 32, 1e-6, "none"),
            ref, 1e-4, 3 * x.numel() * size,
        )  # fmt: skip
    for shape in shapes["vae"]:  # first stage: native nn.GroupNorm + functional SiLU
        for cl in (False, True):
            x, w, b = gn_inputs(shape, cl)
            ref = K.group_norm_act_reference(x, w, b, 32, 1e-6, "silu")
            record(
                "VAE GroupNorm+SiLU", shape, "channels_last" if cl else "nchw",
                lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w, b, 1e-6)),
                lambda x=x, w=w, b=b: K.group_norm_act(x, w, b, 32, 1e-6, "silu"),
                ref, 1e-4, 3 * x.numel() * size,
            )  # fmt: skip
    for shape in shapes["geglu"]:
        h = (torch.randn(shape, generator=gen, device=run.device) * 2).to(dt_)

        def eager_geglu(h: Tensor = h) -> Tensor:
            a, gate = h.chunk(2, dim=-1)
            return a * F.gelu(gate)

        record(
            "GEGLU", shape, "-", eager_geglu, lambda h=h: K.geglu(h), K.geglu_reference(h), 1.0,
            (h.numel() + h.numel() // 2) * size,
        )  # fmt: skip
    return rows


# -- 3.-5. networks ------------------------------------------------------------------------------------------
def networks(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    import validate_fast_path as VFP

    from ldm_sdk.accel import CapturedModel, fuse_model, unfuse_model
    from ldm_sdk.benchmarks import common as C
    from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
    from ldm_sdk.diffusion.denoiser import ModelDenoiser
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers.ddim import sample as ddim_sample

    arch = C.small(C.ARCHS["sd15"]) if run.dry else C.ARCHS["sd15"]
    mode = "emulate" if run.dry else "graph"
    device, dtype = run.device, run.dtype
    unet, vae = VFP.build_sd15(arch, device, dtype, args.seed)
    log(f"SD-1.5 UNet + kl-f8 VAE built (random weights, {dtype}, {arch.image_px} px)")
    res: dict[str, Any] = {}
    g = torch.Generator(device).manual_seed(args.seed + 1)
    lat = arch.image_px // 8
    x = torch.randn(2, 4, lat, lat, generator=g, device=device)  # float32, as the sampler keeps it
    t = torch.tensor([981.0, 421.0], dtype=torch.float64, device=device)
    ctx = torch.randn(2, 77, 768, generator=g, device=device).to(dtype)
    cond = Conditioning(crossattn=ctx)
    model_fn = bind_unet(unet, "crossattn")

    def set_fused(on: bool) -> None:
        for model in (unet, vae):
            fuse_model(model) if on else unfuse_model(model)

    with torch.inference_mode():
        # -- reference: the same weights in float32, TF32 off ----------------------------------------------
        with C.true_float32():
            ref_unet = copy.deepcopy(unet).float()
            ref_step = ref_unet(x, t, context=ctx.float())
            del ref_unet
            z = torch.randn(1, 4, lat, lat, generator=g, device=device)
            ref_vae = copy.deepcopy(vae).float()
            ref_image = ref_vae.decode(z)
            del ref_vae
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # -- 3. UNet step ------------------------------------------------------------------------------------
        step: dict[str, Any] = {}
        for fused in (False, True):
            set_fused(fused)
            tag = "fused_" if fused else ""
            captured = CapturedModel(model_fn, mode=mode, modules=[unet])
            out = model_fn(x, t, cond)
            step[f"{tag}rel_err_vs_fp32"] = rel_err(out, ref_step)
            step[f"{tag}finite"] = bool(torch.isfinite(out).all())
            step[f"{tag}captured_vs_eager"] = rel_err(captured(x, t, cond), out)
            step[f"{tag}eager_ms"] = median_ms(lambda: model_fn(x, t, cond), run)
            step[f"{tag}captured_ms"] = median_ms(lambda captured=captured: captured(x, t, cond), run)
            del captured
        res["unet_step_b2"] = step
        log(f"UNet step b2 {dtype}: " + step_line(step))
        run.check_accuracy("UNet step", step["fused_rel_err_vs_fp32"], step["rel_err_vs_fp32"])
        if not step["fused_finite"]:
            run.fail("UNet step: fused output not finite")
        if step["fused_captured_vs_eager"] > 1e-3:
            run.fail(
                f"UNet step: fused captured vs fused eager rel. err {step['fused_captured_vs_eager']:.3e}"
            )

        # -- 4. end to end -----------------------------------------------------------------------------------
        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))
        noise = torch.randn(1, 4, lat, lat, generator=g, device=device)
        c1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))
        u1 = Conditioning(crossattn=torch.randn(1, 77, 768, generator=g, device=device).to(dtype))

        def image(fn: Any, steps: int, start: Tensor = noise) -> tuple[Tensor, Tensor]:
            den = ModelDenoiser(ClassifierFreeGuidance(fn, args.guidance, u1), sched, "eps", cond=c1)
            latents = ddim_sample(den, start, torch.tensor(C.timesteps(steps), dtype=torch.float64))
            return latents, vae.decode((latents / arch.scale_factor).to(dtype))

        variants: dict[str, tuple[bool, Any]] = {}
        for fused in (False, True):  # capture each variant once, in its own state (graphs keep their kernels)
            set_fused(fused)
            captured = CapturedModel(model_fn, mode=mode, modules=[unet])
            image(captured, 2)
            variants["fused_captured" if fused else "captured"] = (fused, captured)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        outs: dict[str, tuple[Tensor, Tensor]] = {}
        for _ in range(args.e2e_repeats):  # interleaved
            for name, (fused, captured) in variants.items():
                set_fused(fused)
                secs, outs[name] = C.wall(lambda captured=captured: image(captured, args.steps), device)
                runs[name].append(secs)
        set_fused(False)  # the sampler's sensitivity: one fp16 rounding of the starting noise
        nudged = noise * (1 + 2.0**-11)
        _, sensitivity_image = image(variants["captured"][1], args.steps, nudged)
        e2e: dict[str, Any] = {}
        for name, secs in runs.items():
            e2e[f"{name}_s"] = C.median(secs)
            e2e[f"{name}_runs_s"] = secs
        e2e["speedup"] = e2e["captured_s"] / e2e["fused_captured_s"]
        e2e["latents_rel_err"] = rel_err(outs["fused_captured"][0], outs["captured"][0])
        e2e["image_rel_err"] = rel_err(outs["fused_captured"][1], outs["captured"][1])
        e2e["noise_sensitivity_image_rel_err"] = rel_err(sensitivity_image, outs["captured"][1])
        e2e["image_finite"] = bool(torch.isfinite(outs["fused_captured"][1]).all())
        res["e2e_b1"] = e2e
        bound = max(5e-2, 3 * e2e["noise_sensitivity_image_rel_err"])
        log(e2e_line(e2e, args))
        if not e2e["image_finite"] or e2e["image_rel_err"] > bound:
            run.fail(f"e2e: fused image rel. err {e2e['image_rel_err']:.3e} > {bound:.3e} or not finite")
        del variants, outs

        # -- 5. VAE decode -----------------------------------------------------------------------------------
        vae_res: dict[str, Any] = {}
        z16 = z.to(dtype)
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            vae.to(memory_format=fmt)
            zf = z16.contiguous(memory_format=fmt)
            for fused in (False, True):
                set_fused(fused)
                key = f"{fmt_name}_{'fused' if fused else 'eager'}"
                out = vae.decode(zf)
                vae_res[f"{key}_rel_err_vs_fp32"] = rel_err(out, ref_image)
                vae_res[f"{key}_finite"] = bool(torch.isfinite(out).all())
                vae_res[f"{key}_ms"] = median_ms(lambda zf=zf: vae.decode(zf), run)
            run.check_accuracy(
                f"VAE decode {fmt_name}",
                vae_res[f"{fmt_name}_fused_rel_err_vs_fp32"],
                vae_res[f"{fmt_name}_eager_rel_err_vs_fp32"],
            )
            if not vae_res[f"{fmt_name}_fused_finite"]:
                run.fail(f"VAE decode {fmt_name}: fused output not finite")
            log(f"VAE decode {arch.image_px} px " + vae_line(vae_res, fmt_name))
        res["vae_decode_b1"] = vae_res
        if device.type == "cuda":
            res["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res


def step_line(s: dict[str, Any]) -> str:
    return (
        f"eager {s['eager_ms']:.2f} ms | captured {s['captured_ms']:.2f} ms | fused eager "
        f"{s['fused_eager_ms']:.2f} ms | fused+captured {s['fused_captured_ms']:.2f} ms; rel. err vs fp32: "
        f"unfused {s['rel_err_vs_fp32']:.3e}, fused {s['fused_rel_err_vs_fp32']:.3e}"
    )


def e2e_line(e: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"e2e b1, {args.steps} DDIM steps + CFG {args.guidance} + decode: captured {e['captured_s']:.3f} s, "
        f"fused+captured {e['fused_captured_s']:.3f} s ({e['speedup']:.2f}x); fused vs unfused image rel. "
        f"err {e['image_rel_err']:.2e} (noise sensitivity {e['noise_sensitivity_image_rel_err']:.2e})"
    )


def vae_line(v: dict[str, Any], fmt: str) -> str:
    eager, fused = f"{fmt}_eager", f"{fmt}_fused"
    return (
        f"{fmt}: eager {v[eager + '_ms']:.2f} ms, fused {v[fused + '_ms']:.2f} ms; rel. err vs fp32 "
        f"{v[eager + '_rel_err_vs_fp32']:.3e} -> {v[fused + '_rel_err_vs_fp32']:.3e}"
    )


def summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    small = " (small, CPU dry run)" if args.cpu_dry_run else ""
    print(f"\n== fused kernels, SD-1.5{small}, {results['env']['device_name']}")
    head = ("op", "format", "shape", "eager ms", "fused ms", "speedup", "GB/s", "ulps")
    print(f"{head[0]:<22} {head[1]:<13} {head[2]:<22} " + " ".join(f"{h:>9}" for h in head[3:]))
    for r in results["kernels"]:
        shape = str(r["shape"])
        print(
            f"{r['op']:<22} {r['format']:<13} {shape:<22} {r['eager_ms']:9.4f} {r['fused_ms']:9.4f} "
            f"{r['speedup']:8.2f}x {r['fused_gbps']:9.0f} {r['max_ulps']:9.2g}"
        )
    nets = results.get("networks")
    if nets:
        print("UNet step b2: " + step_line(nets["unet_step_b2"]))
        print(e2e_line(nets["e2e_b1"], args))
        for fmt in ("nchw", "channels_last"):
            print("VAE decode " + vae_line(nets["vae_decode_b1"], fmt))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--iters", type=int, default=30, help="timed calls per variant")
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-networks", action="store_true", help="kernels only (sections 1 and 2)")
    p.add_argument(
        "--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false",
        help="leave torch.backends.cudnn.benchmark off (validate_fast_path.py turns it on)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="run the script's logic on the CPU (small sizes)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("validate_kernels.py needs a CUDA device (or --cpu-dry-run)", file=sys.stderr)
        return 2
    from ldm_sdk.accel import triton_kernels as K
    from ldm_sdk.benchmarks import common as C

    if args.cpu_dry_run:
        run = Run(torch.device("cpu"), torch.bfloat16, True, min(args.iters, 3))
        args.steps, args.e2e_repeats = min(args.steps, 4), 1
    else:
        run = Run(torch.device("cuda"), torch.float16, False, args.iters)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        if not K.triton_available():
            print("triton is not installed: nothing to validate", file=sys.stderr)
            return 2
    env = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_name": C.cpu_name() + " (CPU DRY RUN)" if run.dry else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": C.version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cudnn_benchmark": args.cudnn_benchmark,
        "git": C.git_head(),
    }
    log(json.dumps(env))
    results: dict[str, Any] = {"env": env}
    if args.skip_tests or run.dry:
        results["tests"] = {"skipped": True, "passed": True}
    else:
        results["tests"] = run_tests()
        if not results["tests"]["passed"]:
            run.fail("GPU tests failed (see the pytest output above)")
    results["kernels"] = kernel_timings(run)
    if not args.skip_networks:
        results["networks"] = networks(run, args)
    results["failures"] = run.failures
    summary(results, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    log("done" + (f": FAILED ({len(run.failures)})" if run.failures else ": all checks passed"))
    for failure in run.failures:
        print(f"FAILED: {failure}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
