"""Where the SD-1.5 guidance step spends its time: eager vs channels_last vs CUDA-graph replay, and the
top kernels by CUDA time from torch.profiler. The starting point for the GPU fast path.

    python bench/profile_unet.py --dtype fp16 --out profile.json     # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.benchmarks import common as C
from ldm_sdk.models.configs import UNetConfig
from ldm_sdk.models.unet import UNetModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def step_ms(fn: Any, device: torch.device, iters: int = 30) -> float:
    return C.median(C.time_calls(fn, device, warmup=5, iters=iters)) * 1e3


PROFILED_CALLS = 5

#: kernel-name fragments -> category (first match wins), for the "what bounds it" summary
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    # before "conv": the fused GroupNorm kernels' names contain "nhwc" too
    ("norm", ("group_norm", "layer_norm", "norm", "welford", "_gn_")),
    ("conv", ("conv", "implicit", "cudnn", "xmma_fprop", "sm90_xmma", "nhwc")),
    ("gemm", ("gemm", "geglu_tma", "cutlass", "cublas", "nvjet", "matmul", "sm90_")),
    ("elementwise", ("elementwise", "vectorized", "silu", "gelu", "geglu", "add", "mul", "copy", "cat")),
)


def profile_calls(fn: Any) -> Any:
    """torch.profiler over :data:`PROFILED_CALLS` calls of ``fn`` (CUDA kernels only)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        torch.cuda.synchronize()
    return prof


def categories(prof: Any, calls: int) -> dict[str, float]:
    """GPU milliseconds per call, summed by kernel category (names matched by :data:`CATEGORIES`)."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) or 0.0
        if us <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")
        out[cat] = out.get(cat, 0.0) + us / 1e3 / calls
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one CFG step at batch 1)")
    p.add_argument("--top", type=int, default=25, help="kernels to list")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--fuse",
        action="store_true",
        help="fuse the UNet first (norms, GEGLU and blocks, as prepare_cuda_inference)",
    )
    p.add_argument(
        "--profile-layout",
        choices=("nchw", "channels_last"),
        default="channels_last",
        help="memory format of the profiled eager calls",
    )
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True

    gen = torch.Generator().manual_seed(0)
    unet = UNetModel.from_config(UNetConfig(**C.SD15_UNET))
    C.randomize_(unet, gen)
    unet = unet.to(device, dtype).eval()
    if args.fuse:
        from ldm_sdk.accel.block_fusion import fuse_blocks
        from ldm_sdk.accel.fusion import fuse_model

        print(fuse_model(unet))
        print(fuse_blocks(unet))
    b = args.batch
    x = torch.randn(b, 4, 64, 64, generator=gen).to(device, dtype)
    t = torch.full((b,), 501.0, device=device)
    ctx = torch.randn(b, 77, 768, generator=gen).to(device, dtype)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    res["fused"] = args.fuse
    with torch.inference_mode():
        ref = unet(x, t, ctx)
        res["eager_ms"] = step_ms(lambda: unet(x, t, ctx), device)
        if args.profile_layout == "nchw":  # before the in-place channels_last conversion below
            prof = profile_calls(lambda: unet(x, t, ctx))
        unet_cl = unet.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        res["channels_last_ms"] = step_ms(lambda: unet_cl(x_cl, t, ctx), device)
        res["channels_last_rel_err"] = C.rel_err(unet_cl(x_cl, t, ctx).float(), ref.float())
        for name, model, xin in (("graph_ms", unet, x), ("graph_channels_last_ms", unet_cl, x_cl)):
            static_x = xin.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(static_x, t, ctx)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(static_x, t, ctx)
            res[name] = step_ms(graph.replay, device, iters=100)
            res[name.replace("_ms", "_rel_err")] = C.rel_err(static_out.float(), ref.float())

        if args.profile_layout == "channels_last":
            prof = profile_calls(lambda: unet_cl(x_cl, t, ctx))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70)
    res[f"profile_{args.profile_layout}"] = table
    res["gpu_ms_by_category"] = categories(prof, calls=PROFILED_CALLS)
    print(table)
    print("GPU time per call by kernel category (ms):", json.dumps(res["gpu_ms_by_category"]))
    summary = {k: v for k, v in res.items() if not k.startswith("profile")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
