"""Tile-size sweep of the channels_last fused GroupNorm(+SiLU) kernels at the SD-1.5 UNet and kl-f8 decoder
shapes: the column-tile floor (``NHWC_MIN_COLS``), the tile size (``max_block``), the programs aimed for
per SM, and the single-pass kernel (``_auto``: taken where the group fits) against the two kernels. For
each configuration: GPU time per call (replayed from a CUDA graph of 10 calls), effective bandwidth (two
reads and one write of the activation), and the ulp check against the float32 reference -- a
configuration that fails it is reported and never picked.

    python bench/tune_group_norm.py --out tune_gn.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.benchmarks import common as C

SHAPES = [
    (2, 320, 64, 64),
    (2, 640, 64, 64),
    (2, 640, 32, 32),
    (2, 960, 32, 32),
    (2, 1280, 32, 32),
    (2, 1280, 16, 16),
    (2, 1920, 16, 16),
    (2, 2560, 8, 8),
    (2, 1280, 8, 8),
    (1, 128, 512, 512),
    (1, 256, 256, 256),
    (1, 512, 128, 128),
    (1, 512, 64, 64),
]
MIN_COLS = (32, 64, 128, 256)
MAX_BLOCKS = (2048, 4096)
PER_SM = (4, 8)
SINGLE = (False, None)  # the two kernels; the single-pass kernel where the group fits (else the two again)


def graph_ms(fn: Any, reps: int = 10, iters: int = 30) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return 1e3 * C.median(C.time_calls(graph.replay, torch.device("cuda"), 2, iters)) / reps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = (K.NHWC_MIN_COLS, K.MAX_BLOCK, K.PROGRAMS_PER_SM)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    g = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        for shape in SHAPES:
            n, c = shape[:2]
            x = (
                torch.randn(shape, generator=g, device="cuda")
                .half()
                .contiguous(memory_format=torch.channels_last)
            )
            w = torch.randn(c, generator=g, device="cuda").half()
            b = torch.randn(c, generator=g, device="cuda").half()
            shift = torch.randn(n, c, generator=g, device="cuda").half()
            ref = K.group_norm_act_reference(x, w, b, 32, 1e-5, "silu", shift=shift)
            gbytes = 3 * x.numel() * x.element_size() / 1e9
            timings: dict[str, Any] = {}
            for cols, block, per_sm, single in itertools.product(MIN_COLS, MAX_BLOCKS, PER_SM, SINGLE):
                K.NHWC_MIN_COLS = cols

                call = functools.partial(
                    K.group_norm_act_triton,
                    x,
                    w,
                    b,
                    32,
                    1e-5,
                    "silu",
                    shift=shift,
                    target_programs=per_sm * sms,
                    max_block=block,
                    single_pass=single,
                )

                key = f"cols{cols}_block{block}_sm{per_sm}" + ("_auto" if single is None else "")
                try:
                    report = K.compare_ulps(call(), ref)
                    ms = graph_ms(call)
                except Exception as exc:  # a configuration the plan or compiler refuses
                    timings[key] = {"error": str(exc).splitlines()[0][:120]}
                    continue
                timings[key] = {"ms": ms, "gb_s": gbytes / (ms / 1e3), "ok": report.ok(1e-4)}
            K.NHWC_MIN_COLS = default[0]
            ok = {k: v for k, v in timings.items() if v.get("ok")}
            best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
            now = f"cols{default[0]}_block{default[1]}_sm{default[2]}_auto"
            row = {"shape": list(shape), "default": now, "best": best, "configs": timings}
            res["rows"].append(row)
            if best is not None and now in ok:
                d, bb = ok[now], ok[best]
                print(
                    f"{list(shape)}: default {d['ms'] * 1e3:.1f} us ({d['gb_s']:.0f} GB/s), "
                    f"best {best} {bb['ms'] * 1e3:.1f} us ({bb['gb_s']:.0f} GB/s)",
                    flush=True,
                )
    totals: dict[str, float] = {}
    everywhere = set.intersection(*({k for k, v in r["configs"].items() if v.get("ok")} for r in res["rows"]))
    for row in res["rows"]:  # configurations that pass at every shape
        for k in everywhere:
            totals[k] = totals.get(k, 0.0) + row["configs"][k]["ms"]
    res["sum_ms_by_config"] = dict(sorted(totals.items(), key=lambda kv: kv[1]))
    print("sum over shapes (ms), best first:", json.dumps(dict(list(res["sum_ms_by_config"].items())[:6])))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
