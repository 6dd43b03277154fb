"""Measure the activation-memory constants of :mod:`ldm_sdk.tiling.plan` (run once, on a CUDA GPU).

For released architectures (random weights: memory does not depend on the values) it runs one inference
call of the UNet, the first-stage decoder and encoder at several latent sizes and records the peak
``torch.cuda.max_memory_allocated`` above what was allocated before the call (weights and inputs), then
divides it by the plan's unit:

- UNet: ``peak / (h * w * model_channels * bytes_per_element)`` (per batch item);
- decoder / encoder: ``peak / (h * f * w * f * ch * bytes_per_element)``.

Usage: ``python bench/tiling_memory.py [--out FILE.json] [--smoke]`` (``--smoke``: tiny sizes on the CPU,
to check the script; no memory numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ldm_sdk.checkpoints.families import FAMILIES
from ldm_sdk.models.configs import AutoencoderKLConfig
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
from ldm_sdk.models.unet import UNetModel

UNET_FAMILIES = ("ldm-sr-bsr", "ldm-semantic", "ldm-layout", "ldm-celebahq256", "sd1")
FIRST_STAGE_FAMILIES = ("ldm-sr-bsr", "sd1")  # VQ-f4 (ch 128) and KL-f8 (ch 128)


def peak_bytes(fn: Any, device: torch.device) -> int:
    if device.type != "cuda":
        with torch.inference_mode():
            fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure_unet(
    family: str, sides: list[int], dtype: torch.dtype, device: torch.device
) -> list[dict[str, Any]]:
    cfg = FAMILIES[family].config
    assert cfg.unet is not None
    u = cfg.unet
    unet = UNetModel.from_config(u).to(device, dtype).eval()
    bpe = torch.finfo(dtype).bits // 8
    rows = []
    for side in sides:
        x = torch.randn(1, u.in_channels, side, side, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        ctx = torch.randn(1, 77, u.context_dim, device=device, dtype=dtype) if u.context_dim else None
        peak = peak_bytes(lambda x=x, t=t, ctx=ctx: unet(x, t, context=ctx), device)
        unit = side * side * u.model_channels * bpe
        rows.append({"net": "unet", "family": family, "side": side, "dtype": str(dtype), "peak_bytes": peak,
                     "constant": peak / unit})  # fmt: skip
    return rows


def measure_first_stage(
    family: str, sides: list[int], dtype: torch.dtype, device: torch.device
) -> list[dict[str, Any]]:
    fs = FAMILIES[family].config.first_stage
    model = AutoencoderKL.from_config(fs) if isinstance(fs, AutoencoderKLConfig) else VQModel.from_config(fs)
    model = model.to(device, dtype).eval()
    f, ch = fs.ddconfig.downsampling_factor, fs.ddconfig.ch
    bpe = torch.finfo(dtype).bits // 8
    rows = []
    for side in sides:
        z = torch.randn(1, fs.embed_dim, side, side, device=device, dtype=dtype)
        image = torch.rand(1, 3, side * f, side * f, device=device, dtype=dtype) * 2 - 1
        unit = side * side * f * f * ch * bpe
        dec = peak_bytes(lambda z=z: model.decode(z), device)
        enc = peak_bytes(lambda image=image: model.encode(image), device)
        for net, peak in (("decoder", dec), ("encoder", enc)):
            rows.append({"net": net, "family": family, "side": side, "dtype": str(dtype), "peak_bytes": peak,
                         "constant": peak / unit})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtypes = [torch.float32] if args.smoke else [torch.float16, torch.float32]
    unet_sides = [8] if args.smoke else [32, 64, 128]
    fs_sides = [4] if args.smoke else [32, 64, 128]
    rows: list[dict[str, Any]] = []
    start = time.time()
    for dtype in dtypes:
        for family in UNET_FAMILIES if not args.smoke else UNET_FAMILIES[:1]:
            rows += measure_unet(family, unet_sides, dtype, device)
        for family in FIRST_STAGE_FAMILIES if not args.smoke else FIRST_STAGE_FAMILIES[:1]:
            rows += measure_first_stage(family, fs_sides, dtype, device)
    for r in rows:
        print(f"{r['net']:8s} {r['family']:16s} {r['side']:4d} {r['dtype']:14s} "
              f"{r['peak_bytes'] / 2**20:10.1f} MiB  constant {r['constant']:6.2f}")  # fmt: skip
    summary = {}
    for net in ("unet", "decoder", "encoder"):
        values = [r["constant"] for r in rows if r["net"] == net]
        summary[net] = max(values) if values else None
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "seconds": round(time.time() - start, 1)}  # fmt: skip
    print("max constants:", summary, info)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "max": summary, **info}, fh, indent=1)


if __name__ == "__main__":
    main()
