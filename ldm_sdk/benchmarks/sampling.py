"""Sampling benchmark: ldm_sdk ("ours") against diffusers on IDENTICAL random weights, in one run.

    python bench/bench_sampling.py --device cuda --dtype fp16 --out results.json   # the real SD-1.5 size
    python bench/bench_sampling.py --device cpu --size small          # CPU smoke (1-2 min on 2 cores)
    python bench/bench_sampling.py --device cpu --size small --fast   # ours on the CPU fast path
    python bench/bench_sampling.py --cpu-compare --size ci --out bench/results/cpu_DATE.json   # CPU mode

Metrics per engine: one UNet call at batch 2 (a CFG-batched guidance step); end-to-end images (latent noise
-> N DDIM steps with classifier-free guidance -> VAE decode) at each batch size; VAE decode alone; peak
CUDA memory of the batch-1 end-to-end run; FLOPs of one UNet step (torch.utils.flop_counter) and MFU against
a nominal peak; time to the first image of a freshly started process (cold: includes lazy CUDA/cuDNN setup
and, with --compile, compilation). Text/class encoding is EXCLUDED: the context is random.
--fast puts OUR engine on its fast path (diffusers stays eager, as users run it): on CUDA the guidance-batched
UNet call is replayed from a CUDA graph (ldm_sdk.accel.CapturedModel); on the CPU the UNet and VAE get bf16
weights where the CPU computes bf16 natively, channels_last, one thread per usable core, the cross-attention
K/V cache and prepacked weights (ldm_sdk.accel.configure_cpu_inference).
--cpu-compare is the CPU mode: ours eager fp32, ours on the CPU fast path, diffusers fp32 (its default) and
diffusers bf16 + channels_last (the same dtype / layout settings as ours, so the reader sees what the SDK adds
beyond them), optionally ours under torch.compile (--with-compiled), all in one process, measured round-robin
with the 1-minute load average recorded with every measurement; fresh processes give the time to the first
image and the peak RSS. See cpu_compare().
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

from ldm_sdk.benchmarks import common as C
from ldm_sdk.benchmarks.options import add_arguments

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
H100_DENSE_TFLOPS = 989.0  # H100 SXM dense fp16/bf16 tensor-core peak (nominal; H200 has the same)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Check the parsed options (``ValueError`` says what conflicts) and fill the device-dependent defaults,
    in place."""
    if a.fast and a.compile:
        raise ValueError("--fast and --compile are two different fast paths: pass one of them")
    if a.cpu_compare and a.device is None:
        a.device = "cpu"
    if a.cpu_compare and (a.fast or a.compile or a.device != "cpu" or a.dtype or a.channels_last):
        raise ValueError(
            "--cpu-compare sets the engines itself: no --fast / --compile / --dtype / --channels-last; "
            "cpu only"
        )
    if a.with_compiled and not a.cpu_compare:
        raise ValueError("--with-compiled belongs to --cpu-compare (elsewhere use --compile)")
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.dtype_given = a.dtype is not None  # --fast on the CPU picks bf16 itself unless a dtype was asked for
    cuda = a.device.startswith("cuda")
    a.dtype = a.dtype or ("fp16" if cuda else "fp32")
    shrunk = a.size in ("small", "ci")
    a.steps = a.steps or (10 if shrunk else 50)
    default_batches = "1" if a.cpu_compare else ("1,2" if shrunk else "1,8")
    a.batch_sizes = [int(b) for b in (a.batch_sizes or default_batches).split(",")]
    a.iters = a.iters or (20 if cuda else 10 if a.cpu_compare else 3)
    a.e2e_repeats = a.e2e_repeats or (3 if cuda else 5 if a.cpu_compare else 1)
    a.cold_repeats = a.cold_repeats or (2 if cuda else 1)
    if a.peak_tflops is None and cuda and a.dtype != "fp32":
        a.peak_tflops = H100_DENSE_TFLOPS
    return a


def build(args: argparse.Namespace, which: tuple[str, ...]) -> tuple[C.Arch, dict[str, C.Engine], dict]:
    arch = C.SIZES[args.size](C.ARCHS[args.arch])
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
    from ldm_sdk.accel.guided_step import guided_denoiser
    from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers.ddim import sample as ddim_sample

    e.eager_call_unet = e.call_unet  # type: ignore[attr-defined]  # FLOPs: a graph replay dispatches no ops
    # FLOPs counted before the fast path changes the model: FlopCounterMode does not see the Triton GEMMs,
    # the in-place accumulating ones, the prepacked oneDNN ops nor the K/V projections the CPU cache skips;
    # the FLOP row keeps the eager definition of a step (the same work as diffusers')
    x2, dtype = inputs(arch, args, 2), DTYPES[args.dtype]
    ctx2 = torch.cat([x2["uncond"], x2["cond"][:1]]).to(dtype)
    t2 = torch.tensor([999.0, 500.0], device=args.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        e.call_unet(x2["noise"].to(dtype), t2, ctx2)
    e.eager_flops = fc.get_total_flops()  # type: ignore[attr-defined]
    if torch.device(args.device).type == "cuda":
        from ldm_sdk.accel.prepare import prepare_cuda_inference

        fused = [r for r in (prepare_cuda_inference(e.unet), prepare_cuda_inference(e.vae)) if r is not None]
        captured = CapturedModel(
            bind_unet(lambda x, t, **kw: e.fwd(x, t, **kw), "crossattn"), modules=[e.unet]
        )
        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))

        def sample(
            noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int, scale: float
        ) -> torch.Tensor:
            den = guided_denoiser(
                captured,
                sched,
                "eps",
                Conditioning(crossattn=cond),
                Conditioning(crossattn=uncond),
                scale,
                # as the tasks do for a half-precision cross-attention UNet on CUDA
                share_input=arch.unet.get("context_dim") is not None and dtype != torch.float32,
            )
            return ddim_sample(den, noise, torch.tensor(C.timesteps(steps), dtype=torch.float64), eta=0.0)

        e.call_unet = lambda x, t, c: captured(x, t, Conditioning(crossattn=c))
        e.sample = sample
        e.loop += (
            ", the whole guided denoiser call (batching, UNet, guidance, eps/x0) replayed from CUDA graphs "
            "(ldm_sdk.accel.guided_step, as the tasks run it)"
        )
        if fused:  # half precision: what the runtime does at load (UNet and VAE)
            plain_decode = e.decode
            # as the task runner (tasks/context.py captured_decoder): the decode replayed from a CUDA graph,
            # its kernels pre-compiled in parallel at capture
            decoder = CapturedModel(lambda z, t, c: plain_decode(z), max_graphs=2, modules=[e.vae])
            e.decode = lambda z: decoder(z, z.new_zeros(1), Conditioning())
            e.loop += (
                "; fused Triton kernels (GroupNorm+SiLU with folded biases / embedding, bias+residual, "
                "residual+LayerNorm, GEGLU; ldm_sdk.accel.fusion / block_fusion), pre-compiled in parallel, "
                "channels_last; the VAE decode replayed from a CUDA graph too"
            )
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


def run_cold(argv: list[str], engine: str, compiled: bool, cache_dir: str | None = None) -> dict[str, Any]:
    """``engine``'s first image in a fresh process; ``cache_dir``: its inductor cache (default: a new, empty
    one, so compilation starts cold). The Triton kernel cache (the fused kernels of the fast path) is
    always a new, empty folder: their JIT compilation counts toward the first image."""
    cmd = [sys.executable, "-m", "ldm_sdk.benchmarks.sampling", *argv, "--cold-child", engine]
    cmd += ["--cold-compiled"] if compiled else []
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # importable also from a source checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="bench_inductor_")
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_triton_")
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


# -- CPU comparison: four engines in one process, round-robin ------------------------------------------------
CPU_ENGINES = ("ours_fp32", "ours_fast", "diffusers_fp32", "diffusers_bf16_cl")
CPU_LABELS = {
    "ours_fp32": "ours eager fp32",
    "ours_fast": "ours CPU fast path",
    "diffusers_fp32": "diffusers fp32 (default)",
    "diffusers_bf16_cl": "diffusers bf16 + channels_last",
    "ours_compiled": "ours bf16 + channels_last, torch.compile (freezing)",
}


def build_cpu_engines(
    args: argparse.Namespace, names: tuple[str, ...]
) -> tuple[C.Arch, dict[str, C.Engine], dict]:
    """The engines of ``--cpu-compare``, each built from the same seed (identical random weights):

    * ``ours_fp32``: our UNet + first stage, eager fp32, the SDK's DDIM + CFG loop;
    * ``ours_fast``: the same after ``ldm_sdk.accel.configure_cpu_inference`` (bf16 where native,
      channels_last, threads, cross-attention K/V cache, prepacked weights);
    * ``diffusers_fp32``: diffusers' UNet2DConditionModel + AutoencoderKL in fp32, a StableDiffusionPipeline
      loop, as users run it by default;
    * ``diffusers_bf16_cl``: the same in bf16 with channels_last weights (a pipeline loaded with
      ``torch_dtype=torch.bfloat16`` and ``.to(memory_format=torch.channels_last)``);
    * ``ours_compiled`` (``--with-compiled``): ours in bf16 + channels_last, UNet and first-stage decoder
      under ``torch.compile`` with ``torch._inductor.config.freezing = True``.
    """
    from ldm_sdk.accel import configure_cpu_inference

    arch = C.SIZES[args.size](C.ARCHS[args.arch])
    cpu = torch.device("cpu")
    engines: dict[str, C.Engine] = {}
    built: dict = {}
    for name in names:
        ours, b = C.build_ours(arch, cpu, torch.float32, args.seed)
        built = built or b
        if name == "ours_fp32":
            engines[name] = ours
        elif name == "ours_fast":
            done = configure_cpu_inference(ours.unet, ours.vae, threads=0 if args.threads else None)
            ours.dtype = done.dtype
            ours.decode = _decoder(ours.vae, arch.scale_factor, done.dtype)
            ours.loop += f"; CPU fast path: {done.describe()}"
            engines[name] = ours
        elif name == "ours_compiled":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            ours.unet.to(torch.bfloat16, memory_format=torch.channels_last)
            ours.vae.to(torch.bfloat16, memory_format=torch.channels_last)
            ours.dtype = torch.bfloat16
            ours.fwd = torch.compile(ours.unet, dynamic=False)
            ours.vae.decoder = torch.compile(ours.vae.decoder, dynamic=False)  # type: ignore[assignment]
            ours.decode = _decoder(ours.vae, arch.scale_factor, torch.bfloat16)
            ours.loop += "; bf16 + channels_last, UNet and decoder under torch.compile (inductor, freezing)"
            engines[name] = ours
        else:
            dtype = torch.bfloat16 if name == "diffusers_bf16_cl" else torch.float32
            d = C.build_diffusers(arch, cpu, dtype, b)
            if name == "diffusers_bf16_cl":
                d.unet.to(memory_format=torch.channels_last)
                d.vae.to(memory_format=torch.channels_last)
                d.loop += "; bf16, channels_last weights"
            engines[name] = d
        b.pop("ckpt", None), b.pop("orig", None)
        gc.collect()
    return arch, engines, built


def _decoder(vae: torch.nn.Module, scale_factor: float, dtype: torch.dtype) -> Any:
    return lambda z: vae.decode((z / scale_factor).to(dtype))  # type: ignore[operator]


def _rss_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_inputs(arch: C.Arch, args: argparse.Namespace, batch: int, e: C.Engine) -> dict[str, torch.Tensor]:
    """``inputs()`` with the contexts in the engine's dtype (a text encoder run in that dtype)."""
    x = inputs(arch, args, batch)
    return {"noise": x["noise"], "cond": x["cond"].to(e.dtype), "uncond": x["uncond"].to(e.dtype)}


def cpu_cold_child(args: argparse.Namespace) -> dict[str, Any]:
    """A fresh process: build one engine, then time its first batch-1 image and its peak RSS."""
    arch, engines, _ = build_cpu_engines(args, (args.cold_child,))
    e = engines[args.cold_child]
    x = _cpu_inputs(arch, args, 1, e)
    gc.collect()
    rss_before = _rss_mib("VmRSS")
    reset = _reset_peak_rss()
    with torch.inference_mode():
        secs, img = C.wall(lambda: image(e, x, args.steps, args.guidance), torch.device("cpu"))
    res = {
        "ttfi_s": secs,
        "finite": bool(torch.isfinite(img[1]).all()),
        "rss_before_mib": rss_before,
        "peak_rss_mib": _rss_mib("VmHWM") if reset else None,
        "param_mib": e.param_bytes() / 2**20,
        "load_1min": C.load_1min(),
    }
    print("COLD_JSON " + json.dumps(res), flush=True)
    return res


def cpu_compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every metric for every engine, round-robin (A B C D A B C D ...) so that load from other processes
    spreads over all engines; the 1-minute load average is recorded with every measurement."""
    if args.cold_child:
        return cpu_cold_child(args)
    names = CPU_ENGINES + (("ours_compiled",) if args.with_compiled else ())
    cpu = torch.device("cpu")
    cold: dict[str, Any] = {}
    if not args.no_cold:
        runs: dict[str, list[dict]] = {n: [] for n in names}
        compile_cache = tempfile.mkdtemp(prefix="bench_inductor_")  # shared by the compiled engine's runs
        for _ in range(args.cold_repeats):
            for n in names:
                runs[n].append(run_cold(argv, n, False, compile_cache if n == "ours_compiled" else None))
        if "ours_compiled" in names:  # a second fresh process on the now warm inductor cache
            warm = run_cold(argv, "ours_compiled", False, compile_cache)
            cold["ours_compiled_warm_cache"] = {
                "runs": [warm],
                **({"ttfi_s": warm["ttfi_s"]} if "ttfi_s" in warm else {}),
            }
        for n, rs in runs.items():
            ok = [r for r in rs if "ttfi_s" in r]
            if n == "ours_compiled":  # only the first run compiled from an empty cache
                ok = ok[:1]
            cold[n] = {"runs": rs}
            if ok:
                cold[n]["ttfi_s"] = min(r["ttfi_s"] for r in ok)
                peaks = [r for r in ok if r.get("peak_rss_mib") is not None and r.get("rss_before_mib")]
                if peaks:
                    cold[n]["peak_rss_mib"] = min(r["peak_rss_mib"] for r in peaks)
                    cold[n]["peak_rss_over_start_mib"] = min(
                        r["peak_rss_mib"] - r["rss_before_mib"] for r in peaks
                    )
            else:
                cold[n]["error"] = rs[-1].get("error")
    if "ours_compiled" in names:  # the main process compiles from an empty cache too (unless one is set)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_inductor_"))
    arch, engines, built = build_cpu_engines(args, names)
    log(f"engines built: {', '.join(engines)}; {torch.get_num_threads()} torch thread(s)")
    res: dict[str, dict[str, Any]] = {n: {} for n in engines}

    def rounds(metric: str, calls: dict[str, Any], n_rounds: int, warmup: int) -> None:
        with torch.inference_mode():
            for n, fn in calls.items():
                if metric == "unet_ms" and n == "ours_compiled":  # first call = compile
                    res[n]["compile_unet_s"], _ = C.wall(fn, cpu)
                for _ in range(warmup):
                    fn()
            samples: dict[str, list[list[float]]] = {n: [] for n in calls}
            for _ in range(n_rounds):
                for n, fn in calls.items():
                    load = C.load_1min()
                    secs, _ = C.wall(fn, cpu)
                    samples[n].append([secs, load])
        for n, ss in samples.items():
            res[n][metric + "_runs"] = [{"s": s, "load_1min": ld} for s, ld in ss]
            med = C.median([s for s, _ in ss])
            res[n][metric] = 1e3 * med if metric.endswith("_ms") else med

    x2 = {n: _cpu_inputs(arch, args, 2, e) for n, e in engines.items()}
    calls = {}
    for n, e in engines.items():
        ctx2 = torch.cat([x2[n]["uncond"], x2[n]["cond"][:1]])
        xt = (x2[n]["noise"].to(e.x_dtype), e.t_like(2, 501.0, cpu))
        calls[n] = lambda e=e, xt=xt, ctx2=ctx2: e.call_unet(*xt, ctx2)
    log("UNet step, batch 2")
    rounds("unet_ms", calls, args.iters, 3)
    z = inputs(arch, args, 1)["noise"]
    if "ours_compiled" in engines:
        res["ours_compiled"]["compile_decoder_s"], _ = C.wall(lambda: engines["ours_compiled"].decode(z), cpu)
    log("VAE decode")
    rounds("vae_ms", {n: (lambda e=e: e.decode(z)) for n, e in engines.items()}, max(3, args.iters // 2), 2)
    images: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for b in args.batch_sizes:
        xb = {n: _cpu_inputs(arch, args, b, e) for n, e in engines.items()}
        log(f"end to end, batch {b}")
        with torch.inference_mode():
            for n, e in engines.items():
                image(e, xb[n], 2, args.guidance)  # warm-up at this batch size
        calls = {
            n: (
                lambda e=e, x=xb[n], n=n, b=b: images.__setitem__(
                    (n, b), image(e, x, args.steps, args.guidance)
                )
            )
            for n, e in engines.items()
        }
        rounds(f"e2e_b{b}_s", calls, args.e2e_repeats, 0)
        for n in engines:
            res[n][f"e2e_b{b}_s_per_image"] = res[n][f"e2e_b{b}_s"] / b
    b0 = args.batch_sizes[0]
    parity: dict[str, Any] = {}
    for ref in ("ours_fp32", "diffusers_fp32"):
        if (ref, b0) not in images:
            continue
        lat_r, img_r = images[ref, b0]
        parity["vs_" + ref] = {
            n: {"latents": C.rel_err(images[n, b0][0], lat_r), "image": C.rel_err(images[n, b0][1], img_r)}
            for n in engines
        }
    finite = {n: bool(torch.isfinite(images[n, b0][1]).all()) for n in engines}
    for n, c in cold.items():
        for k in ("ttfi_s", "peak_rss_mib", "peak_rss_over_start_mib"):
            if k in c and n in res:
                res[n][k] = c[k]
    if "ttfi_s" in cold.get("ours_compiled_warm_cache", {}):
        res["ours_compiled"]["ttfi_warm_cache_s"] = cold["ours_compiled_warm_cache"]["ttfi_s"]
    speedups = {
        f"{n}_vs_{other}": {
            k: res[other][k] / res[n][k] for k in ("unet_ms", "vae_ms", f"e2e_b{b0}_s_per_image")
        }
        for n in engines
        for other in ("diffusers_fp32", "diffusers_bf16_cl")
        if n != other and other in res
    }
    n_params = built.get("unet_params")
    results: dict[str, Any] = {
        "mode": "cpu-compare",
        "args": vars(args),
        "config": {
            "arch": args.arch,
            "size": args.size,
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.unet.items()},
            "unet_params": n_params,
            "first_stage": arch.first_stage,
            "first_stage_ch": arch.vae_ch,
            "image_px": arch.image_px,
            "context": [arch.tokens, arch.unet["context_dim"]],
            "steps": args.steps,
            "guidance": args.guidance,
            "sampler": "DDIM eta 0, timesteps i * (1000 // steps) + 1",
        },
        "engines": res,
        "loops": {n: e.loop for n, e in engines.items()},
        "speedups": speedups,
        "parity_rel_err_b1": parity,
        "finite": finite,
        "cold": cold,
        "env": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device_name": C.cpu_name(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "diffusers": C.version("diffusers"),
            "cpu_threads": torch.get_num_threads(),
            "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "git": C.git_head(),
        },
    }
    show_cpu_compare(results, b0)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return results


def show_cpu_compare(results: dict[str, Any], b0: int) -> None:
    eng = results["engines"]
    names = list(eng)
    rows_spec = [
        ("unet_ms", "UNet step, batch 2 (CFG) [ms]"),
        ("vae_ms", "VAE decode b1 [ms]"),
        (f"e2e_b{b0}_s_per_image", f"e2e batch {b0} [s/image]"),
        ("ttfi_s", "time to first image, fresh process [s]"),
        ("ttfi_warm_cache_s", "  same, second process, warm inductor cache [s]"),
        ("peak_rss_mib", "peak RSS during that image, fresh process [MiB]"),
        ("peak_rss_over_start_mib", "  of which above the RSS before the image [MiB]"),
        ("compile_unet_s", "compile + first UNet call (batch 2), main process [s]"),
        ("compile_decoder_s", "compile + first decode, main process [s]"),
    ]
    head = ["metric", *(CPU_LABELS.get(n, n) for n in names)]
    rows = []
    for key, label in rows_spec:
        vals = [eng[n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        rows.append([label, *("-" if v is None else f"{v:.4g}" for v in vals)])
    for other in ("diffusers_fp32", "diffusers_bf16_cl"):
        for key, label in rows_spec[:3]:
            vals = [results["speedups"].get(f"{n}_vs_{other}", {}).get(key) for n in names]
            rows.append(
                [
                    f"speedup vs {CPU_LABELS[other]}: {label.split(' [')[0]}",
                    *("-" if v is None else f"{v:.2f}x" for v in vals),
                ]
            )
    for ref, per in results["parity_rel_err_b1"].items():
        rows.append([f"final latents, rel. err {ref}", *(f"{per[n]['latents']:.1e}" for n in names)])
        rows.append([f"final image, rel. err {ref}", *(f"{per[n]['image']:.1e}" for n in names)])
    loads = [
        r["load_1min"]
        for n in names
        for k, v in eng[n].items()
        if k.endswith("_runs")
        for r in v
        if r["load_1min"] is not None
    ]
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    cfg = results["config"]
    print(
        f"- config: {cfg['arch']} size {cfg['size']}: UNet {cfg['unet']} ({cfg['unet_params']:,} params), "
        f"first stage {cfg['first_stage']} ch {cfg['first_stage_ch']}, {cfg['image_px']} px, context "
        f"{cfg['context']}, {cfg['steps']} DDIM steps, guidance {cfg['guidance']}"
    )
    for n, loop in results["loops"].items():
        print(f"- {n}: {loop}")
    if loads:
        print(f"- 1-minute load average during the measurements: {min(loads):.2f} to {max(loads):.2f}")
    bad = [n for n, ok in results["finite"].items() if not ok]
    for n in bad:
        print(f"- WARNING: non-finite image: {n}")
    print(
        f"- {results['env']['device_name']}, {results['env']['cpu_threads']} torch thread(s), torch "
        f"{results['env']['torch']}, diffusers {results['env']['diffusers']}"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return resolve(a)
    except ValueError as exc:
        p.error(str(exc))


def to_argv(a: argparse.Namespace) -> list[str]:
    """The command line that gives the (not yet resolved) options ``a``: what fresh processes receive."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    argv: list[str] = []
    for action in p._actions:
        if not action.option_strings or action.dest == "help" or not hasattr(a, action.dest):
            continue
        value = getattr(a, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``bench/bench_sampling.py``: parse ``argv`` (default ``sys.argv[1:]``) and run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parse(argv), argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the benchmark with resolved options ``args``; ``argv`` (their command line) is handed to the
    fresh processes that time the first image."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_compare:
        return cpu_compare(args, argv)
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
            flops[n] = getattr(e, "eager_flops", None) or fc.get_total_flops()
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
