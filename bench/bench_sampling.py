"""Sampling benchmark: ldm_sdk ("ours") against diffusers on IDENTICAL random weights, in one run.

    python bench/bench_sampling.py --device cuda --dtype fp16 --out results.json   # the real SD-1.5 size
    python bench/bench_sampling.py --device cpu --size small          # CPU smoke (1-2 min on 2 cores)
    python bench/bench_sampling.py --device cpu --size small --fast   # ours on the CPU fast path

Metrics per engine: one UNet call at batch 2 (a CFG-batched guidance step); end-to-end images (latent noise
-> N DDIM steps with classifier-free guidance -> VAE decode) at each batch size; VAE decode alone; peak
CUDA memory of the batch-1 end-to-end run; FLOPs of one UNet step (torch.utils.flop_counter) and MFU against
a nominal peak; time to the first image of a freshly started process (cold: includes lazy CUDA/cuDNN setup
and, with --compile, compilation). Text/class encoding is EXCLUDED: the context is random.
--fast puts OUR engine on its fast path (diffusers stays eager, as users run it): on CUDA the guidance-batched
UNet call is replayed from a CUDA graph (ldm_sdk.accel.CapturedModel); on the CPU the UNet and VAE get bf16
weights where the CPU computes bf16 natively, channels_last and one thread per usable core
(ldm_sdk.accel.configure_cpu_inference).
The "speedup" column is diffusers/ours for lower-is-better rows and ours/diffusers for higher-is-better
rows, so > 1 always means ours is better.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
import _common as C

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
H100_DENSE_TFLOPS = 989.0  # H100 SXM dense fp16/bf16 tensor-core peak (nominal; H200 has the same)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(C.ARCHS), default="sd15")
    p.add_argument("--size", choices=["full", "small"], default="full", help="small: width-shrunk CPU smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 10 with --size small)")
    p.add_argument("--batch-sizes", default=None, help="end-to-end batch sizes (default 1,8; small 1,2)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets (both engines)")
    p.add_argument(
        "--fast",
        action="store_true",
        help="ours only: CUDA-graph replay of the UNet call on cuda; bf16 where native, channels_last and "
        "threads on cpu (ldm_sdk.accel). diffusers stays eager",
    )
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--iters", type=int, default=None, help="timed UNet/VAE calls (default 20 cuda, 3 cpu)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed e2e runs (default 3 cuda, 1 cpu)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="nominal peak for MFU (default: 989 on cuda)"
    )
    p.add_argument("--no-cold", action="store_true", help="skip the cold time-to-first-image subprocesses")
    p.add_argument(
        "--cold-repeats", type=int, default=None, help="fresh processes per engine (2 cuda, 1 cpu)"
    )
    p.add_argument("--no-diffusers", action="store_true", help="time ours only")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on shared cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write everything as JSON here")
    p.add_argument("--cold-child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--cold-compiled", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.fast and a.compile:
        p.error("--fast and --compile are two different fast paths: pass one of them")
    a.dtype_given = a.dtype is not None  # --fast on the CPU picks bf16 itself unless a dtype was asked for
    cuda = a.device.startswith("cuda")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.dtype = a.dtype or ("fp16" if cuda else "fp32")
    a.steps = a.steps or (10 if a.size == "small" else 50)
    a.batch_sizes = [int(b) for b in (a.batch_sizes or ("1,2" if a.size == "small" else "1,8")).split(",")]
    a.iters = a.iters or (20 if cuda else 3)
    a.e2e_repeats = a.e2e_repeats or (3 if cuda else 1)
    a.cold_repeats = a.cold_repeats or (2 if cuda else 1)
    if a.peak_tflops is None and cuda and a.dtype != "fp32":
        a.peak_tflops = H100_DENSE_TFLOPS
    return a


def build(args: argparse.Namespace, which: tuple[str, ...]) -> tuple[C.Arch, dict[str, C.Engine], dict]:
    arch = C.ARCHS[args.arch]
    arch = C.small(arch) if args.size == "small" else arch
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours, built = C.build_ours(arch, device, dtype, args.seed)
    engines = {"ours": ours}
    if "diffusers" in which:
        engines["diffusers"] = C.build_diffusers(arch, device, dtype, built)
    if "ours" not in which:
        del engines["ours"]
    del built["ckpt"], built["orig"], ours
    gc.collect()  # engines hold reference cycles (closures): free a dropped one now
    if args.channels_last:
        for e in engines.values():
            e.unet.to(memory_format=torch.channels_last)
            e.vae.to(memory_format=torch.channels_last)
    if args.fast and "ours" in engines:
        accelerate_ours(engines["ours"], arch, args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return arch, engines, built


def accelerate_ours(e: C.Engine, arch: C.Arch, args: argparse.Namespace) -> None:
    """Put our engine on the SDK's fast path (see the module docstring); the same sampler stack runs."""
    from ldm_sdk.accel import CapturedModel, configure_cpu_inference
    from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
    from ldm_sdk.diffusion.denoiser import ModelDenoiser
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers.ddim import sample as ddim_sample

    e.eager_call_unet = e.call_unet  # type: ignore[attr-defined]  # FLOPs: a graph replay dispatches no ops
    if torch.device(args.device).type == "cuda":
        captured = CapturedModel(
            bind_unet(lambda x, t, **kw: e.fwd(x, t, **kw), "crossattn"), modules=[e.unet]
        )
        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))

        def sample(
            noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int, scale: float
        ) -> torch.Tensor:
            cfg = ClassifierFreeGuidance(captured, scale, Conditioning(crossattn=uncond))
            den = ModelDenoiser(cfg, sched, "eps", cond=Conditioning(crossattn=cond))
            return ddim_sample(den, noise, torch.tensor(C.timesteps(steps), dtype=torch.float64), eta=0.0)

        e.call_unet = lambda x, t, c: captured(x, t, Conditioning(crossattn=c))
        e.sample = sample
        e.loop += ", the guidance-batched UNet call replayed from CUDA graphs (ldm_sdk.accel.CapturedModel)"
        return
    done = configure_cpu_inference(
        e.unet,
        e.vae,
        dtype=args.dtype if args.dtype_given else None,
        threads=0 if args.threads else None,  # --threads was applied already
    )
    e.dtype = done.dtype
    vae, scale_factor = e.vae, arch.scale_factor
    e.decode = lambda z: vae.decode((z / scale_factor).to(done.dtype))
    e.loop += f"; CPU fast path: {done.describe()}"


def inputs(arch: C.Arch, args: argparse.Namespace, batch: int) -> dict[str, torch.Tensor]:
    """Fixed-seed latent noise, conditional and unconditional contexts for ``batch`` images."""
    device = torch.device(args.device)
    g = torch.Generator(device).manual_seed(args.seed + 1000 + batch)
    lat = arch.image_px // C.FIRST_STAGE_ZOO[arch.first_stage].ddconfig.downsampling_factor
    ch, ctx = arch.unet["in_channels"], arch.unet["context_dim"]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return {
        "noise": torch.randn(batch, ch, lat, lat, generator=g, device=device).contiguous(memory_format=fmt),
        # contexts in the UNet dtype, as a text/class encoder run in that dtype would give them
        "cond": torch.randn(batch, arch.tokens, ctx, generator=g, device=device).to(DTYPES[args.dtype]),
        "uncond": torch.randn(1, arch.tokens, ctx, generator=g, device=device).to(DTYPES[args.dtype]),
    }


def image(e: C.Engine, x: dict[str, torch.Tensor], steps: int, scale: float) -> tuple[torch.Tensor, ...]:
    """(final latents, decoded image) of one end-to-end run."""
    latents = e.sample(x["noise"], x["cond"], x["uncond"], steps, scale)
    return latents, e.decode(latents)


def compile_engine(e: C.Engine, mode: str) -> None:
    e.fwd = torch.compile(e.unet, mode=mode, dynamic=False)


def cold_child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh process: build one engine, then time its very first image (batch 1)."""
    arch, engines, _ = build(args, (args.cold_child,))
    e, device = engines[args.cold_child], torch.device(args.device)
    if args.cold_compiled:
        compile_engine(e, args.compile_mode)
    x = inputs(arch, args, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        secs, img = C.wall(lambda: image(e, x, args.steps, args.guidance), device)
    res = {"ttfi_s": secs, "finite": bool(torch.isfinite(img[1]).all())}
    if device.type == "cuda":
        res["solo_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("COLD_JSON " + json.dumps(res), flush=True)
    return res


def run_cold(argv: list[str], engine: str, compiled: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--cold-child", engine]
    cmd += ["--cold-compiled"] if compiled else []
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inductor_")  # cold: no warm cache
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    log(f"fresh process {engine}{' compiled' if compiled else ''}: {proc.stdout.strip()[-120:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("COLD_JSON "):
            return json.loads(line[len("COLD_JSON ") :])
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def measure(engines: dict[str, C.Engine], arch: C.Arch, args: argparse.Namespace, flops: dict) -> dict:
    """Every timed metric, interleaving the engines metric by metric."""
    device, res = torch.device(args.device), {n: {} for n in engines}
    cuda = device.type == "cuda"
    x2 = inputs(arch, args, 2)
    ctx2 = torch.cat([x2["uncond"], x2["cond"][:1]])
    for n, e in engines.items():  # the call as the engine's own loop makes it (its x and t dtypes)
        xt = (x2["noise"].to(e.x_dtype), e.t_like(2, 501.0, device))
        # warm-up: on CPU the first few calls of a process are several times slower (fresh pages)
        s = C.time_calls(lambda e=e, xt=xt: e.call_unet(*xt, ctx2), device, 3, args.iters)
        r = res[n]
        r["unet_ms"], r["unet_ms_all"] = 1e3 * C.median(s), [1e3 * v for v in s]
        r["unet_tflops"] = flops[n] / C.median(s) / 1e12
        if args.peak_tflops:
            r["mfu_pct"] = 100 * r["unet_tflops"] / args.peak_tflops
    z = inputs(arch, args, 1)["noise"]
    for n, e in engines.items():
        s = C.time_calls(lambda e=e: e.decode(z), device, 2, max(2, args.iters // 2))
        res[n]["vae_ms"] = 1e3 * C.median(s)
    images = {}
    for b in args.batch_sizes:
        x = inputs(arch, args, b)
        for n, e in engines.items():
            image(e, x, 2, args.guidance)  # warm-up at this batch size (new shapes)
            if cuda:
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            runs = [
                C.wall(lambda e=e, x=x: image(e, x, args.steps, args.guidance), device)
                for _ in range(args.e2e_repeats)
            ]
            sec = C.median([r[0] for r in runs])
            res[n][f"e2e_b{b}_s_per_image"], res[n][f"e2e_b{b}_images_per_s"] = sec / b, b / sec
            res[n][f"e2e_b{b}_runs_s"] = [r[0] for r in runs]
            log(f"{n} e2e batch {b}: {[round(r[0], 3) for r in runs]} s")
            images[n, b] = runs[-1][1]
            if b == 1:
                step_s = (sec - res[n]["vae_ms"] / 1e3) / args.steps
                res[n]["loop_overhead_ms_per_step"] = 1e3 * step_s - res[n]["unet_ms"]
                if cuda:
                    work = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    res[n]["peak_working_mib"] = work
                    res[n]["peak_mib"] = work + e.param_bytes() / 2**20
    return {"engines": res, "images": images}


ROWS = [  # key, label, lower-is-better ("{b}": one row per end-to-end batch size)
    ("unet_ms", "UNet step, batch 2 (CFG) [ms]", True),
    ("unet_tflops", "UNet achieved TFLOP/s", False),
    ("mfu_pct", "UNet MFU [%]", False),
    ("e2e_b{b}_s_per_image", "e2e batch {b}: s/image", True),
    ("e2e_b{b}_images_per_s", "e2e batch {b}: images/s", False),
    ("loop_overhead_ms_per_step", "loop overhead/step, b1 [ms] (derived: e2e-UNet-VAE)", True),
    ("vae_ms", "VAE decode {px}px b1 [ms]", True),
    ("peak_mib", "peak CUDA memory, e2e b1 [MiB]", True),
    ("ttfi_s", "time to first image, fresh process [s] (min)", True),
    ("compile_s", "compile + first UNet call [s]", True),
]


def table(results: dict[str, Any], args: argparse.Namespace, px: int) -> list[list[str]]:
    specs = [(k, lbl, low, None) for k, lbl, low in ROWS if "{b}" not in k]
    e2e = [(k, lbl, low, b) for b in args.batch_sizes for k, lbl, low in ROWS if "{b}" in k]
    specs[3:3] = e2e  # after the three UNet rows
    rows = []
    for section, data in results["sections"].items():
        eng = data["engines"]
        for key, label, lower, b in specs:
            o, d = eng.get("ours", {}).get(key.format(b=b)), eng.get("diffusers", {}).get(key.format(b=b))
            if o is None and d is None:
                continue
            ratio = f"{(d / o if lower else o / d):.2f}x" if o and d and o * d > 0 else ""
            cells = ["-" if v is None else f"{v:.4g}" for v in (o, d)]
            rows.append([f"[{section}] " + label.format(b=b, px=px), *cells, ratio])
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.cold_child:
        return cold_child(args)
    device = torch.device(args.device)
    which = ("ours",) if args.no_diffusers else ("ours", "diffusers")
    cold: dict[str, dict] = {}
    if not args.no_cold:  # before this process takes GPU memory; one fresh process per measurement
        # primer: a throwaway small run puts torch/CUDA/cuDNN/diffusers files in the OS page cache, so
        # the first measured process does not pay for disk reads that the later ones skip
        if device.type == "cuda":
            run_cold([*argv, "--size", "small", "--steps", "2"], which[-1], False)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.cold_repeats):  # alternating engines; the row reports the fastest process
            for n in which:
                runs.setdefault(n, []).append(run_cold(argv, n, False))
        for n in which if args.compile else ():
            runs[n + "_compiled"] = [run_cold(argv, n, True)]
        for k, rs in runs.items():
            ok = [r["ttfi_s"] for r in rs if "ttfi_s" in r]
            cold[k] = {"runs": rs, **({"ttfi_s": min(ok)} if ok else {"error": rs[-1].get("error")})}
    arch, engines, built = build(args, which)
    log("engines built")
    notes = [
        f"arch {args.arch} ({args.size}): UNet {built['unet_params']:,} params, {arch.image_px}px, "
        f"{args.dtype}, {args.steps} DDIM steps, guidance {args.guidance}, "
        f"channels_last={args.channels_last}",
        f"text/class encoding EXCLUDED: contexts are random [B, {arch.tokens}, {arch.unet['context_dim']}]",
        *(f"{n} loop: {e.loop}" for n, e in engines.items()),
    ]
    results: dict[str, Any] = {"args": vars(args), "sections": {}, "cold": cold, "notes": notes}
    with torch.inference_mode():
        x2, dtype = inputs(arch, args, 2), DTYPES[args.dtype]  # inputs in the engines' dtype
        x2["noise"], t2 = x2["noise"].to(dtype), torch.tensor([999.0, 500.0], device=device)
        ctx2 = torch.cat([x2["uncond"], x2["cond"][:1]]).to(dtype)
        outs = {n: e.call_unet(x2["noise"], t2, ctx2) for n, e in engines.items()}
        flops = {}
        for n, e in engines.items():
            with FlopCounterMode(display=False) as fc:
                getattr(e, "eager_call_unet", e.call_unet)(x2["noise"], t2, ctx2)
            flops[n] = fc.get_total_flops()
        results["unet_gflops_per_step"] = {n: f / 1e9 for n, f in flops.items()}
        results["finite"] = {n: bool(torch.isfinite(o).all()) for n, o in outs.items()}
        if "diffusers" in outs:
            results["unet_parity_rel_err"] = C.rel_err(outs["ours"], outs["diffusers"])
            results["unet_out_absmax"] = outs["diffusers"].abs().max().item()
        first = "fast (ours)" if args.fast else "eager"
        sections = [(first, False)] + ([("compiled", True)] if args.compile else [])
        for section, compiled in sections:
            if compiled:
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_inductor_"))
                warm = torch.compile(lambda a: torch.nn.functional.silu(a @ a), dynamic=False)
                warm(torch.randn(64, 64, device=device, dtype=dtype))  # inductor start-up
                compile_s = {}
                for n, e in engines.items():
                    compile_engine(e, args.compile_mode)
                    xt = (x2["noise"].to(e.x_dtype), e.t_like(2, 501.0, device))
                    compile_s[n], _ = C.wall(lambda e=e, xt=xt: e.call_unet(*xt, ctx2), device)
            log(f"measuring {section}" + (f" (compile: {compile_s})" if compiled else ""))
            m = measure(engines, arch, args, flops)
            for n in engines:
                r = m["engines"][n]
                if compiled:
                    r["compile_s"] = compile_s[n]
                c = cold.get(n + ("_compiled" if compiled else ""), {})
                if "ttfi_s" in c:
                    r["ttfi_s"] = c["ttfi_s"]
                r["image_finite"] = all(
                    bool(torch.isfinite(v[1]).all()) for (k, _), v in m["images"].items() if k == n
                )
            results["sections"][section] = sec = {"engines": m["engines"]}
            if ("diffusers", 1) in m["images"]:
                (lat_o, img_o), (lat_d, img_d) = m["images"]["ours", 1], m["images"]["diffusers", 1]
                sec["latent_parity_rel_err_b1"] = C.rel_err(lat_o, lat_d)
                sec["image_parity_rel_err_b1"] = C.rel_err(img_o, img_d)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else C.cpu_name()
    results["env"] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "diffusers": C.version("diffusers"),
        "cpu_threads": torch.get_num_threads(),
        "git": C.git_head(),
    }
    if "unet_parity_rel_err" in results:
        notes.append(
            f"UNet parity (one call, batch 2, {args.dtype}): max|ours-diffusers|/max|diffusers| = "
            f"{results['unet_parity_rel_err']:.2e} (max|diffusers| = {results['unet_out_absmax']:.3g})"
        )
        vq = arch.first_stage.startswith("vq")
        for s, d in results["sections"].items():
            if "image_parity_rel_err_b1" in d:
                notes.append(
                    f"[{s}] parity after {args.steps} steps, b1: "
                    f"latents {d['latent_parity_rel_err_b1']:.2e}, "
                    f"images {d['image_parity_rel_err_b1']:.2e}"
                    + (" (VQ: nearest-code lookup amplifies tiny latent differences)" if vq else "")
                )
    notes.append(
        "FLOPs per UNet step (FlopCounterMode): "
        + ", ".join(f"{n} {g:.1f} GFLOP" for n, g in results["unet_gflops_per_step"].items())
    )
    notes.append(
        f"MFU peak used: {args.peak_tflops} TFLOP/s"
        + (" (H100 SXM dense fp16/bf16, nominal)" if args.peak_tflops == H100_DENSE_TFLOPS else "")
        + f"; device: {name}"
    )
    bad = [k for k, v in results["finite"].items() if not v] + [
        f"{s}/{n}"
        for s, d in results["sections"].items()
        for n, r in d["engines"].items()
        if not r.get("image_finite", True)
    ]
    notes.extend(f"WARNING: non-finite output: {b}" for b in bad)
    notes.extend(f"WARNING: cold run {k} failed: {v['error']}" for k, v in cold.items() if "error" in v)
    C.show(table(results, args, arch.image_px), notes)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
