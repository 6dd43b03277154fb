"""The SD-1.5 UNet step with the fast path's switches on and off: which change buys what.

Each variant is a fresh random SD-1.5 UNet (the same weights: seed 0) in fp16, prepared as the runtime
prepares it (:func:`~ldm_sdk.accel.prepare.prepare_cuda_inference`: channels_last, fused norms, fused
blocks), then one switch changed; the step is captured in a CUDA graph and timed by replay (CUDA events,
median of ``--iters``) at each UNet batch (2 = one guidance step at image batch 1, 16 = image batch 8).
``rel_err``: ``max |out - ref| / max |ref|`` at batch 2 against the eager float32 UNet.

    python bench/ablate_unet.py --out ablate.json                          # on a CUDA machine
    python bench/ablate_unet.py --variants default,no_one_gemm --batches 2

Variants: ``default`` (what the runtime runs), ``no_one_gemm`` (GEGLU as cuBLAS + the gating kernel
instead of the dual GEMM where that is used), ``no_shared_embedding`` (each ResBlock projects the time
embedding itself), ``unfused_blocks`` (norms fused, blocks not).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel.block_fusion import FusedResBlock
from ldm_sdk.accel.fusion import FusedGEGLU, fuse_model
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C


def _no_one_gemm(unet: nn.Module) -> None:
    for m in unet.modules():
        if isinstance(m, FusedGEGLU):
            m.one_gemm = False


def _no_shared_embedding(unet: nn.Module) -> None:
    for m in unet.modules():
        if isinstance(m, FusedResBlock):
            m.emb_shifts = None


VARIANTS: dict[str, Callable[[nn.Module], None] | None] = {
    "default": None,
    "no_one_gemm": _no_one_gemm,
    "no_shared_embedding": _no_shared_embedding,
    "unfused_blocks": None,  # built differently below
}


def build(variant: str, device: torch.device) -> nn.Module:
    unet = C.random_sd15_unet(device).half()
    if variant == "unfused_blocks":
        unet.to(memory_format=torch.channels_last)
        fuse_model(unet)
        return unet
    prepare_cuda_inference(unet)
    change = VARIANTS[variant]
    if change is not None:
        change(unet)
    return unet


def graph_ms(unet: nn.Module, batch: int, iters: int, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    device = torch.device("cuda")
    x = torch.randn(batch, 4, 64, 64, generator=gen, device=device).half()
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 501.0, device=device)
    ctx = torch.randn(batch, 77, 768, generator=gen, device=device).half()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            unet(x, t, ctx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = unet(x, t, ctx)
    times = C.time_calls(graph.replay, device, warmup=5, iters=iters)
    del graph
    return C.median(times) * 1e3, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batches", default="2,16", help="UNet batch sizes (comma list)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument(
        "--gemm-conv-max-rows",
        type=int,
        default=None,
        help="override ldm_sdk.accel.small_conv.GEMM_CONV_MAX_ROWS (0: every 3x3 conv on cuDNN)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.gemm_conv_max_rows is not None:
        from ldm_sdk.accel import small_conv

        small_conv.GEMM_CONV_MAX_ROWS = args.gemm_conv_max_rows
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    device = torch.device("cuda")
    batches = [int(b) for b in args.batches.split(",")]
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batches": batches,
        "gemm_conv_max_rows": args.gemm_conv_max_rows,
        "variants": {},
    }
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=gen, device=device)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, 768, generator=gen, device=device)
    with torch.inference_mode(), C.true_float32():
        ref = C.random_sd15_unet(device)(x, t, ctx).float()
    for variant in variants:
        unet = build(variant, device)
        row: dict[str, Any] = {}
        for batch in batches:
            ms, _ = graph_ms(unet, batch, args.iters, torch.Generator(device).manual_seed(2))
            row[f"b{batch}_ms"] = round(ms, 4)
        with torch.inference_mode():
            out = unet(x.half().contiguous(memory_format=torch.channels_last), t, ctx.half()).float()
        row["rel_err"] = float((out - ref).abs().max() / ref.abs().max())
        res["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
        del unet
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
