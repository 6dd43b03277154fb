"""GPU time of the channels_last GroupNorm(+SiLU) statistics and apply kernels, each on its own, over
tilings: column tile, tile size, warps per kernel and programs per SM, at the kl-f8 decoder's and the
SD-1.5 UNet's norm shapes; with a read-only torch sum and a copy of the same map as the bandwidth marks.

Why: a GroupNorm's time per configuration hides which of its two kernels a change helps; the two share a
launch plan (the apply kernel merges the statistics' per-chunk partials) and are timed here in the same
run, as they run. The times are the profiler's GPU time per call (20 eager calls after 3 warm-up calls),
not a graph replay.

    python bench/gn_kernel_split.py --out bench/results/gn_split_h100.json      # on a CUDA machine

Prints, per shape, the package default's two times, the marks and the four best configurations per kernel,
then per shape set (the decoder's norms of one decode, weighted by their call counts; SD-1.5 at batches 2
and 16) the five configurations with the smallest sum of both kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel import triton_kernels as K

STATS, APPLY = "_gn_stats_nhwc_kernel", "_gn_apply_nhwc_kernel"
DECODER = {  # shape -> calls per kl-f8 decode at 512 px
    (1, 128, 512, 512): 6,
    (1, 256, 512, 512): 1,
    (1, 256, 256, 256): 5,
    (1, 512, 256, 256): 1,
    (1, 512, 128, 128): 6,
    (1, 512, 64, 64): 11,
}
UNET_B2 = {(2, 320, 64, 64): 1, (2, 640, 32, 32): 1}
UNET_B16 = {(16, 320, 64, 64): 1, (16, 640, 32, 32): 1, (16, 1280, 16, 16): 1}


def gpu_us(fn: Callable[[], Any], reps: int = 20) -> dict[str, float]:
    """Profiler GPU time per call of each kernel ``fn`` launches (first 40 characters of its name)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {
        e.key[:40]: round(e.self_device_time_total / reps, 2)
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and e.count
    }


def configs() -> dict[str, tuple[K.NhwcTiles, int]]:
    """name -> (tiling with the same warps for both kernels, programs per SM), 8 to 64 elements per
    thread."""
    out = {}
    for cols in (32, 64):
        for block in (2048, 4096, 8192):
            for warps in (2, 4, 8):
                if not 8 <= block // (32 * warps) <= 64:
                    continue
                for per_sm in (4, 8):
                    tiles = K.NhwcTiles(block, cols, 1, stats_warps=warps, apply_warps=warps)
                    out[f"c{cols}_b{block}_w{warps}_sm{per_sm}"] = (tiles, per_sm)
    return out


def measure(shape: tuple[int, int, int, int]) -> dict[str, Any]:
    x = torch.randn(shape, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    shift = torch.randn(shape[0], shape[1], device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row: dict[str, Any] = {
        "MB": x.numel() * 2 / 1e6,
        "sum": gpu_us(lambda: x.sum(dtype=torch.float32)),
        "copy": gpu_us(lambda: x.clone()),
        "default": gpu_us(lambda: K.group_norm_act_triton(x, w, b, 32, 1e-6, "silu", shift=shift)),
    }
    for name, (tiles, per_sm) in configs().items():
        row[name] = gpu_us(
            lambda tiles=tiles, per_sm=per_sm: K.group_norm_act_triton(
                x, w, b, 32, 1e-6, "silu", shift=shift, target_programs=per_sm * sms, nhwc=tiles,
                single_pass=False,
            )
        )  # fmt: skip
    return row


def fastest(row: dict[str, Any], kernel: str) -> list[tuple[float, str]]:
    """The four configurations of ``row`` with the shortest time of ``kernel``."""
    return sorted((r[kernel], n) for n, r in row.items() if isinstance(r, dict) and kernel in r)[:4]


def best_configs(rows: dict[str, dict[str, Any]], weights: dict[tuple[int, ...], int]) -> list[Any]:
    """The five configurations with the smallest weighted sum of both kernels' times over ``weights``'
    shapes, each kernel timed as it ran in that configuration (pairing one configuration's statistics
    kernel with another's apply kernel is not a measurement: the apply pass's time depends on what the
    statistics pass before it left in L2)."""
    ranked = []
    for name in configs():
        times = [rows[str(shape)][name] for shape in weights]
        total = sum(n * (t[STATS] + t[APPLY]) for n, t in zip(weights.values(), times, strict=True))
        ranked.append((round(total, 1), name))
    return sorted(ranked)[:5]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    with torch.inference_mode():
        for shape in {**DECODER, **UNET_B2, **UNET_B16}:
            row = measure(shape)
            res["rows"][str(shape)] = row
            best = {k: fastest(row, k) for k in (STATS, APPLY)}
            marks = {k: row[k] for k in ("sum", "copy", "default")}
            print(shape, f"{row['MB']:.1f} MB", marks, "best", best, flush=True)
    for name, weights in (("decoder", DECODER), ("unet_b2", UNET_B2), ("unet_b16", UNET_B16)):
        defaults = [(n, res["rows"][str(s)]["default"]) for s, n in weights.items()]
        # the package default may take the single-pass kernel (small groups): every norm kernel counts
        default = sum(n * sum(t for k, t in d.items() if k.startswith("_gn_")) for n, d in defaults)
        res[name] = {"default_us": round(default, 1), "best": best_configs(res["rows"], weights)}
        print(name, json.dumps(res[name]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
