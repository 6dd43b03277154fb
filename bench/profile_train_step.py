"""What bounds a training step of the section 4.1 experiment's UNets (docs/experiments.md): arithmetic,
kernel launches, the optimizer or the EMA.

For each factor's UNet (the experiment's own ``design_unet``, 32.6M parameters each) on random latents of
its size, batch 256, bf16 autocast (the ``h100`` preset), this times one training step built up piece by
piece, each time with a host sync at the end of the step as the trainer has (it reads the loss):

* ``fwd_bwd``: UNet forward, L2 loss to random targets, backward;
* ``+adamw``: plus ``torch.optim.AdamW`` as the trainer builds it (foreach implementation);
* ``+adamw_fused``: the same with ``fused=True``;
* ``+ema``: plus the trainer's EMA update (:class:`ldm_sdk.training.ema.LitEma`, one update per parameter);
* ``+ema_foreach``: the same update as one ``torch._foreach_lerp_`` over all parameters (same math:
  ``s - (1 - d) (s - p)`` = ``lerp(s, p, 1 - d)``).

It also reports the summed CUDA kernel time of one ``fwd_bwd`` step from torch.profiler (what the GPU
actually computes) and the number of kernels, so wall time far above kernel time means the step is bound
by the host (Python and kernel launches), not by the GPU. Counted FLOPs give the achieved TFLOP/s.

    PYTHONPATH=/tmp/site:$PWD python bench/profile_train_step.py --out train_step_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(ROOT / "training" / "experiments")):
    if extra not in sys.path:
        sys.path.insert(0, extra)

from ldm_factors_lib.architectures import (  # noqa: E402
    LATENT_CHANNELS,
    design_unet,
    latent_size,
    training_flops,
)
from ldm_factors_lib.presets import resolve_preset  # noqa: E402

from ldm_sdk.models.unet import UNetModel  # noqa: E402
from ldm_sdk.training.ema import LitEma  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Any, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds of ``step()`` with a sync after each, as the trainer (it reads the loss)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_time(step: Any, device: torch.device) -> tuple[float, int]:
    """Summed device-kernel seconds and kernel count of one ``step()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    _sync(device)
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events)
    return total_us / 1e6, len(events)


def profile_factor(f: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    preset = resolve_preset(args.preset)
    design = design_unet(preset, f)
    model = UNetModel.from_config(design.config).to(device).train()
    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    gen = torch.Generator(device=device).manual_seed(0)
    n = args.batch
    x = torch.randn(n, c, s, s, device=device, generator=gen)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (n,), device=device, generator=gen)
    ctx = torch.randn(n, 1, preset.context_dim, device=device, generator=gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    opt_fused = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    ema = LitEma(model).to(device)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    shadows = [getattr(ema, ema.m_name2s_name[name]) for name in trained]

    def fwd_bwd() -> None:
        with autocast:
            loss = F.mse_loss(model(x, t, ctx).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        loss.item()

    def with_adam(o: torch.optim.Optimizer) -> Any:
        def step() -> None:
            with autocast:
                loss = F.mse_loss(model(x, t, ctx).float(), target)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
            loss.item()

        return step

    def with_ema(foreach: bool) -> Any:
        base = with_adam(opt_fused)

        def step() -> None:
            base()
            if foreach:
                with torch.no_grad():
                    torch._foreach_lerp_(shadows, [p.detach() for p in params], 1.0 - 0.9999)
            else:
                ema(model)

        return step

    rows: dict[str, Any] = {}
    variants = {
        "fwd_bwd": fwd_bwd,
        "+adamw": with_adam(opt),
        "+adamw_fused": with_adam(opt_fused),
        "+ema": with_ema(False),
        "+ema_foreach": with_ema(True),
    }
    torch.backends.cudnn.benchmark = False  # as the trainer runs today
    for name, fn in variants.items():
        model.zero_grad(set_to_none=True)
        rows[name] = time_steps(fn, device, args.warmup, args.iters)
        print(f"f={f:<2} {name:<14} {rows[name] * 1e3:8.1f} ms/step", flush=True)
    k_s, k_n = kernel_time(fwd_bwd, device)
    torch.backends.cudnn.benchmark = True
    bench_variants = {"fwd_bwd+cudnn_bench": fwd_bwd, "+ema_foreach+cudnn_bench": variants["+ema_foreach"]}
    for name, fn in bench_variants.items():
        rows[name] = time_steps(fn, device, args.warmup, args.iters)
        print(f"f={f:<2} {name:<14} {rows[name] * 1e3:8.1f} ms/step", flush=True)
    kb_s, _ = kernel_time(fwd_bwd, device)
    torch.backends.cudnn.benchmark = False
    flops = training_flops(preset, f, design.config)
    unet_train_tflop = 3 * flops["unet_fwd_gflop"] * n / 1e3
    out = {
        "factor": f,
        "latent": [c, s, s],
        "params": design.params,
        "batch": n,
        "ms_per_step": {k: v * 1e3 for k, v in rows.items()},
        "fwd_bwd_kernel_ms": k_s * 1e3,
        "fwd_bwd_kernels": k_n,
        "fwd_bwd_kernel_ms_cudnn_bench": kb_s * 1e3,
        "unet_train_tflop_per_step": unet_train_tflop,
        "achieved_tflops_fwd_bwd": unet_train_tflop / rows["fwd_bwd"],
        "achieved_tflops_kernels_only": unet_train_tflop / k_s if k_s else None,
    }
    print(
        f"f={f:<2} fwd_bwd kernels {k_s * 1e3:.1f} ms in {k_n} kernels "
        f"(wall {rows['fwd_bwd'] * 1e3:.1f} ms); {out['achieved_tflops_fwd_bwd']:.1f} TFLOP/s achieved",
        flush=True,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="h100")
    p.add_argument("--factors", default="1,2,4,8,16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(env, flush=True)
    results = [profile_factor(int(f), args, device) for f in args.factors.split(",")]
    if args.out:
        args.out.write_text(json.dumps({"environment": env, "factors": results}, indent=2))


if __name__ == "__main__":
    main()
