"""The one-tile short-key attention kernel (``ldm_sdk.accel.short_attention``) against
``F.scaled_dot_product_attention`` (torch's choice: cuDNN on an H100) at the SD-1.5 UNet's shapes, each
timed from a CUDA graph of 20 back-to-back calls, and the kernel's tiling (queries per tile, warps of the
wide heads, programs per SM) swept; then the whole UNet step with and without the kernel, graph-replayed,
same process.

    python bench/bench_short_attention.py --out bench/results/short_attention_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from op_roofline import graph_us

from ldm_sdk.accel import block_fusion as BF
from ldm_sdk.accel import short_attention as A
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C
from ldm_sdk.models.attention import multi_head_attention

#: (queries, keys, head dim) of the SD-1.5 UNet's attentions with at most 128 keys (8 heads each)
SHAPES = ((4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160), (64, 64, 160))
TILINGS = (
    (64, 4, 2), (64, 4, 4), (64, 4, 8), (64, 4, 16), (64, 4, 32), (64, 8, 2), (128, 8, 2), (128, 8, 4),
    (128, 8, 8), (128, 8, 16), (32, 4, 2), (32, 4, 4), (32, 4, 8),
)  # fmt: skip


def per_shape(batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    g = torch.Generator("cuda").manual_seed(0)
    for n, m, d in SHAPES:
        q = torch.randn(batch, n, 8 * d, generator=g, device="cuda").half()
        kv = torch.randn(batch, m, 16 * d, generator=g, device="cuda").half()
        k, v = kv.split(8 * d, dim=-1)
        sdpa = functools.partial(multi_head_attention, q, k, v, 8, d**-0.5)
        kernel = functools.partial(A.short_attention_triton, q, k, v, 8, d**-0.5)
        row: dict[str, float] = {"sdpa_us": round(graph_us(sdpa, 20, 30), 2)}
        saved = dict(A.TILING)
        block_d = max(16, 1 << (d - 1).bit_length())
        for bm, warps, per_sm in TILINGS:  # (queries per tile, warps, programs per SM)
            A.TILING[block_d] = (bm, warps, per_sm)
            key = f"kernel_m{bm}_w{warps}_p{per_sm}_us"
            try:
                row[key] = round(graph_us(kernel, 20, 30), 2)
            except Exception as exc:  # a tiling Triton cannot build: say so
                row[key] = f"failed: {type(exc).__name__}"  # type: ignore[assignment]
            finally:
                A.TILING.update(saved)
        out[f"q{n}_k{m}_d{d}"] = row
        print(batch, n, m, d, row, flush=True)
    return out


def whole_step(batches: list[int], rounds: int) -> dict[str, Any]:
    unet = C.random_sd15_unet(torch.device("cuda")).half()
    prepare_cuda_inference(unet)
    g = torch.Generator("cuda").manual_seed(1)
    res: dict[str, Any] = {}
    pays = A.kernel_pays
    for b in batches:
        x = torch.randn(b, 4, 64, 64, generator=g, device="cuda").half()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), 501.0, device="cuda")
        ctx = torch.randn(b, 77, 768, generator=g, device="cuda").half()
        for _ in range(rounds):
            for name, patch in (("kernel", pays), ("sdpa", lambda *a: False)):
                BF.kernel_pays = patch  # type: ignore[assignment]
                try:
                    with torch.inference_mode():
                        ms = graph_us(functools.partial(unet, x, t, ctx), 1, 30) / 1e3
                finally:
                    BF.kernel_pays = pays  # type: ignore[assignment]
                res.setdefault(f"step_b{b}_{name}_ms", []).append(round(ms, 4))
                print(f"step b{b} {name} {ms:.4f} ms", flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    batches = [int(b) for b in args.batches.split(",") if b]
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for b in batches:
        res[f"shapes_b{b}"] = per_shape(b)
    res.update(whole_step(batches, args.rounds))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
