"""Memset nodes in the fast path's CUDA graphs, and what rewriting them as fill kernels buys.

The SD-1.5 UNet (batch 2 and 16, fp16, prepared as the runtime prepares it) and the kl-f8 decode (512 px)
are each captured twice with ``keep_graph=True``: once left as captured, once with
:func:`ldm_sdk.accel.graph_memsets.replace_memset_nodes` applied before instantiation. Reported per graph:
memset nodes found / replaced, memset events in a profiled replay before / after, whether both graphs
compute the same bits, and the replay time of each (CUDA events, median of 40, three alternating rounds).

    python bench/probe_graph_memsets.py --out bench/results/graph_memsets_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from op_roofline import captured

from ldm_sdk.accel.graph_memsets import replace_memset_nodes
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C


def capture(fn: Callable[[], Tensor], keep: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """The graph of one call of ``fn`` (``op_roofline.captured``) and its static output."""
    outs: list[Tensor] = []
    graph = captured(lambda: outs.append(fn()), keep_graph=keep)
    return graph, outs[-1]  # the captured call's


def memset_events(graph: torch.cuda.CUDAGraph) -> tuple[int, int]:
    """(memset events, all GPU events) of one profiled replay."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum("Memset" in e.name for e in events), len(events)


def ab(fn: Callable[[], Tensor]) -> dict[str, Any]:
    plain, out_plain = capture(fn, keep=False)
    rewritten, out_rewritten = capture(fn, keep=True)
    report = replace_memset_nodes(rewritten, torch.device("cuda"))
    rewritten.instantiate()
    plain.replay()
    rewritten.replay()
    torch.cuda.synchronize()
    res: dict[str, Any] = {
        "found": report.found,
        "replaced": report.replaced,
        "kept": report.kept,
        "same_bits": bool(torch.equal(out_plain, out_rewritten)),
        "memset_events_plain": memset_events(plain),
        "memset_events_rewritten": memset_events(rewritten),
    }
    for _ in range(3):
        for name, graph in (("plain", plain), ("rewritten", rewritten)):
            ms = C.median(C.time_calls(graph.replay, torch.device("cuda"), warmup=3, iters=40)) * 1e3
            res.setdefault(f"{name}_ms", []).append(round(ms, 4))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    dev = torch.device("cuda")
    gen = torch.Generator("cuda").manual_seed(1)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    unet = C.random_sd15_unet(dev).half()
    prepare_cuda_inference(unet)
    for b in (2, 16):
        x = torch.randn(b, 4, 64, 64, generator=gen, device=dev).half()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), 501.0, device=dev)
        ctx = torch.randn(b, 77, 768, generator=gen, device=dev).half()
        with torch.inference_mode():
            res[f"unet_b{b}"] = ab(functools.partial(unet, x, t, ctx))
        print(f"unet b{b}", res[f"unet_b{b}"], flush=True)
    del unet
    torch.cuda.empty_cache()
    eng, _ = C.build_ours(C.ARCHS["sd15"], dev, torch.float16, 0)
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    z = torch.randn(1, 4, 64, 64, generator=gen, device=dev).half()
    with torch.inference_mode():
        res["decode"] = ab(functools.partial(vae.decode, z))
    print("decode", res["decode"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
