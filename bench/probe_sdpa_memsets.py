"""Memset nodes in the SD-1.5 UNet step graph by attention backend: how many, which kernel follows each,
the time from a memset's start to the next kernel's start, the GPU's busy time against the replay's span,
and the graph's replay time -- with torch's default attention (cuDNN on an H100) and with the flash /
memory-efficient kernels for the cross-attentions or everywhere. Run with the short-key attention kernel
off (``ldm_sdk.accel.short_attention`` would take the cross-attentions itself).

    python bench/probe_sdpa_memsets.py --batch 2 --out bench/results/graph_memsets_sdpa_backends_b2_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from op_roofline import captured, graph_us

from ldm_sdk.accel import block_fusion as BF
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C

SDPA = F.scaled_dot_product_attention


def by_keys(self_backend: SDPBackend | None, cross_backend: SDPBackend | None) -> Callable[..., Any]:
    """An SDPA that forces ``cross_backend`` for 77-key calls and ``self_backend`` for the others (None:
    torch's choice)."""

    def sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        backend = cross_backend if k.shape[-2] == 77 else self_backend
        if backend is None:
            return SDPA(q, k, v, *args, **kwargs)
        with sdpa_kernel([backend]):
            return SDPA(q, k, v, *args, **kwargs)

    return sdpa


VARIANTS: dict[str, Callable[..., Any] | None] = {
    "default": None,
    "cross_efficient": by_keys(None, SDPBackend.EFFICIENT_ATTENTION),
    "cross_flash": by_keys(None, SDPBackend.FLASH_ATTENTION),
    "all_flash": by_keys(SDPBackend.FLASH_ATTENTION, SDPBackend.FLASH_ATTENTION),
}


@contextlib.contextmanager
def patched(sdpa: Callable[..., Any] | None) -> Iterator[None]:
    F.scaled_dot_product_attention = sdpa or SDPA  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = SDPA  # type: ignore[assignment]


def analyse(graph: torch.cuda.CUDAGraph) -> dict[str, Any]:
    """One profiled replay: kernels, memsets, the kernel after each memset, memset-to-next-start time, busy
    time, span and the gaps between events (microseconds)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.time_range.start)
    memsets = [i for i, e in enumerate(events) if "Memset" in e.name]
    after: dict[str, int] = {}
    to_next = 0.0
    for i in memsets:
        if i + 1 < len(events):
            name = events[i + 1].name[:70]
            after[name] = after.get(name, 0) + 1
            to_next += events[i + 1].time_range.start - events[i].time_range.start
    pairs = itertools.pairwise(events)
    return {
        "kernels": len(events),
        "memsets": len(memsets),
        "after": after,
        "memset_to_next_us": to_next,
        "busy_us": sum(e.time_range.elapsed_us() for e in events),
        "span_us": events[-1].time_range.end - events[0].time_range.start,
        "gaps_us": sum(max(0, b.time_range.start - a.time_range.end) for a, b in pairs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    dev, b = torch.device("cuda"), args.batch
    gen = torch.Generator("cuda").manual_seed(1)
    unet = C.random_sd15_unet(dev).half()
    prepare_cuda_inference(unet)
    BF.kernel_pays = lambda *a: False  # type: ignore[assignment]  # the library attentions throughout
    x = torch.randn(b, 4, 64, 64, generator=gen, device=dev).half()
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((b,), 501.0, device=dev)
    ctx = torch.randn(b, 77, 768, generator=gen, device=dev).half()
    fn = functools.partial(unet, x, t, ctx)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": b}
    with torch.inference_mode():
        for name, sdpa in VARIANTS.items():
            with patched(sdpa):
                fn()
                res[name] = analyse(captured(fn, 1))
            print(name, {k: v for k, v in res[name].items() if k != "after"}, flush=True)
        for _ in range(args.rounds):
            for name, sdpa in VARIANTS.items():
                with patched(sdpa):
                    res[name].setdefault("graph_ms", []).append(round(graph_us(fn, 1, 30) / 1e3, 4))
                print(name, res[name]["graph_ms"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
