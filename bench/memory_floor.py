"""The memory-bound passes of an SD-1.5 UNet step that the library products cannot absorb, and what moving
their bytes takes at the GPU's measured copy bandwidth.

cuDNN's convolutions and cuBLAS's GEMMs take no normalisation in their prologue, so with them every
GroupNorm and LayerNorm of the step reads its input and writes its output at least once, and every
nearest 2x upsampling reads its input and writes four times as much (the convolution after it reads a
stored map). Residual adds, biases, skip concatenations and the GEGLU gating are left out: each could ride
in a product's epilogue or be written in place. The bytes counted are therefore the least the step's
non-library passes must move; their time at the device-to-device copy bandwidth (``--bandwidth``, measured
on the GPU) estimates the time those passes take when their maps come from and go to device memory. It
is an estimate, not a bound: part of a map can still be in L2 when the next kernel reads it.

The model runs on the ``meta`` device with forward hooks on its norms and upsamplings: no weights, no GPU.

    python bench/memory_floor.py --batches 2,16                   # bytes only, anywhere
    python bench/memory_floor.py --batches 2,16 --bandwidth --out floor.json   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.benchmarks.common import SD15_UNET
from ldm_sdk.models.configs import UNetConfig
from ldm_sdk.models.unet import UNetModel, Upsample

LATENT = 64
"""Latent side of a 512 px SD-1.5 image."""
CONTEXT = (77, 768)
"""Prompt tokens and their width."""


def pass_bytes(config: dict[str, Any], batch: int, element_bytes: int = 2) -> dict[str, dict[str, int]]:
    """Bytes moved per UNet call by its norms and upsamplings, by pass kind and by latent side.

    Norms: input read once, output written once. Upsamplings: input read once, the 2x output written once.
    """
    with torch.device("meta"):
        unet = UNetModel.from_config(UNetConfig(**config)).eval()
    moved: dict[str, Counter[str]] = {"norm": Counter(), "upsample": Counter()}

    def norm_hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = args[0]
        moved["norm"][_side(x)] += (x.numel() + out.numel()) * element_bytes

    def upsample_hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = args[0]
        moved["upsample"][_side(x)] += (x.numel() + out.numel()) * element_bytes

    for module in unet.modules():
        if isinstance(module, nn.GroupNorm | nn.LayerNorm):
            module.register_forward_hook(norm_hook)
        elif isinstance(module, Upsample):
            module.register_forward_hook(upsample_hook)
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(batch, config["in_channels"], LATENT, LATENT)
        unet(x, torch.full((batch,), 501.0), torch.empty(batch, *CONTEXT))
    return {kind: dict(sorted(by_side.items())) for kind, by_side in moved.items()}


def _side(x: torch.Tensor) -> str:
    """The latent side a norm's input belongs to: ``(B, C, H, W)`` maps or ``(B, H * W, C)`` token rows."""
    if x.dim() == 4:
        return f"{x.shape[-1]}x{x.shape[-2]}"
    side = round(x.shape[1] ** 0.5)
    return f"{side}x{side}"


def copy_bandwidth(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read plus write), timed from a CUDA graph of copies."""
    from op_roofline import graph_us

    src = torch.empty(size_bytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * size_bytes / (graph_us(lambda: dst.copy_(src), repeat=10, iters=20) / 1e6)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16", help="UNet batch sizes (comma list; 2 = one guided image)")
    p.add_argument("--bandwidth", action="store_true", help="measure the copy bandwidth (needs CUDA)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    res: dict[str, Any] = {"model": "sd15", "latent": LATENT, "element_bytes": 2}
    bandwidth = None
    if args.bandwidth:
        if not torch.cuda.is_available():
            p.error("--bandwidth needs a CUDA device")
        bandwidth = copy_bandwidth()
        res.update(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=bandwidth / 1e9)
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s on {res['device']}", flush=True)
    for b in (int(s) for s in args.batches.split(",")):
        moved = pass_bytes(SD15_UNET, b)
        totals = {kind: sum(by_side.values()) for kind, by_side in moved.items()}
        row: dict[str, Any] = {"bytes": moved, "total_bytes": totals, "all_bytes": sum(totals.values())}
        if bandwidth is not None:
            row["ms_at_copy_bandwidth"] = {k: v / bandwidth * 1e3 for k, v in totals.items()}
            row["all_ms"] = row["all_bytes"] / bandwidth * 1e3
        res[f"unet_b{b}"] = row
        print(f"batch {b}: {json.dumps(row)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
