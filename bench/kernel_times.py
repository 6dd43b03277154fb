"""Every Triton launch of one forward, timed alone: the SD-1.5 UNet (batches ``--batches``) and the kl-f8
decode (512 px) as the runtime prepares them (:func:`~ldm_sdk.accel.prepare.prepare_cuda_inference`).

The forward runs once with the fused modules recording their launches instead of making them
(:class:`~ldm_sdk.accel.triton_kernels.KernelRecorder`, as the pre-compilation does); each recorded launch
is then replayed on the very tensors it was recorded with, ``--repeat`` times back to back inside one CUDA
graph, and timed by graph replay (median of ``--iters`` replays, CUDA events). The library kernels
(cuDNN, cuBLAS) are not in the list. Per kernel: launches, summed microseconds per forward, the compiled
variants it took; per launch: its microseconds, constexprs, the bytes of its tensor arguments (each
storage once) and those bytes per second -- for a memory-bound kernel that touches each once, its
bandwidth, which points at launches far from the card's. Run it from two checkouts
(``bench/ab_checkouts.py``) to see which kernel a change made faster or slower.

    python bench/kernel_times.py --out kernel_times.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel.precompile import _variant, recording
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.accel.triton_kernels import Launch
from ldm_sdk.benchmarks import common as C


def record(modules: list[Any], call: Callable[[], object]) -> list[Launch]:
    """The launches ``call()`` makes through the fused modules of ``modules``, in order (none made)."""
    with recording(modules) as recorder, torch.inference_mode():
        call()
    return list(recorder.launches)


def launch_us(launch: Launch, repeat: int, iters: int) -> float:
    """Microseconds per launch of ``launch`` replayed ``repeat`` times from one CUDA graph."""

    def once() -> None:
        launch.kernel[launch.grid](*launch.args, **launch.kwargs)

    once()  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            once()
    return C.median(C.time_calls(graph.replay, torch.device("cuda"), warmup=2, iters=iters)) * 1e6 / repeat


def tensor_bytes(launch: Launch) -> int:
    """Bytes of the distinct tensors among ``launch``'s arguments (each storage once): what a memory-bound
    kernel moves at most if it touches each once (its inputs read, its outputs written)."""
    seen: dict[tuple[int, int], int] = {}
    for a in launch.args:
        base = getattr(a, "base", a)  # a TMA descriptor's tensor
        if isinstance(base, Tensor):
            seen.setdefault((base.data_ptr(), base.numel()), base.numel() * base.element_size())
    return sum(seen.values())


def name_of(launch: Launch) -> str:
    return str(getattr(getattr(launch.kernel, "fn", launch.kernel), "__name__", type(launch.kernel).__name__))


def summarise(launches: list[Launch], repeat: int, iters: int) -> dict[str, Any]:
    per_kernel: dict[str, dict[str, Any]] = {}
    rows = []
    variants: dict[str, set[Any]] = {}
    for launch in launches:
        us = launch_us(launch, repeat, iters)
        name = name_of(launch)
        entry = per_kernel.setdefault(name, {"launches": 0, "us": 0.0})
        entry["launches"] += 1
        entry["us"] += us
        variants.setdefault(name, set()).add(_variant(launch))
        constexprs = {k: v for k, v in launch.kwargs.items() if isinstance(v, int | str | bool)}
        nbytes = tensor_bytes(launch)
        rows.append(
            {
                "kernel": name,
                "us": round(us, 2),
                "mbytes": round(nbytes / 1e6, 3),
                "gb_s": round(nbytes / 1e3 / us, 1),
                "grid": list(launch.grid),
                "kwargs": constexprs,
            }
        )
    for name, entry in per_kernel.items():
        entry["us"] = round(entry["us"], 1)
        entry["variants"] = len(variants[name])
    ordered = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]["us"]))
    return {
        "total_us": round(sum(e["us"] for e in per_kernel.values()), 1),
        "kernels": ordered,
        "launches": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16", help="UNet batch sizes (comma list; empty: none)")
    p.add_argument("--no-decode", action="store_true", help="leave out the decode")
    p.add_argument("--repeat", type=int, default=20, help="launches per captured graph")
    p.add_argument("--iters", type=int, default=10, help="graph replays timed per launch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    dev = torch.device("cuda")
    gen = torch.Generator("cuda").manual_seed(1)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    batches = [int(v) for v in args.batches.split(",") if v]
    if batches:
        unet = C.random_sd15_unet(dev).half()
        prepare_cuda_inference(unet)
        for b in batches:
            x = torch.randn(b, 4, 64, 64, generator=gen, device=dev).half()
            x = x.contiguous(memory_format=torch.channels_last)
            t = torch.full((b,), 501.0, device=dev)
            ctx: Tensor = torch.randn(b, 77, 768, generator=gen, device=dev).half()
            launches = record([unet], lambda x=x, t=t, ctx=ctx: unet(x, t, ctx))
            res[f"unet_b{b}"] = summarise(launches, args.repeat, args.iters)
            print(f"unet b{b}: {len(launches)} launches, {res[f'unet_b{b}']['total_us']} us", flush=True)
        del unet
        torch.cuda.empty_cache()
    if not args.no_decode:
        eng, _ = C.build_ours(C.ARCHS["sd15"], dev, torch.float16, 0)
        vae = eng.vae.to(memory_format=torch.channels_last)
        prepare_cuda_inference(vae)
        z = torch.randn(1, 4, 64, 64, generator=gen, device=dev).half()
        launches = record([vae], lambda: vae.decode(z))
        res["decode"] = summarise(launches, args.repeat, args.iters)
        print(f"decode: {len(launches)} launches, {res['decode']['total_us']} us", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
