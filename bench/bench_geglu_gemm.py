"""The GEGLU dual GEMM (``ldm_sdk.accel.geglu_gemm``) against cuBLAS ``F.linear`` + the separate GEGLU kernel,
at the SD-1.5 transformer feed-forward shapes, with a small sweep of launch plans to pick the defaults from.

    python bench/bench_geglu_gemm.py --out bench/results/geglu_gemm_h100.json     # on a CUDA machine
    python bench/bench_geglu_gemm.py --dtype bf16 --batches 16 --no-sweep         # a quicker look

Shapes ``(M, C, I)``: ``C = 320, I = 1280, M = B x 4096``; ``C = 640, I = 2560, M = B x 1024``;
``C = 1280, I = 5120, M = B x 256`` and ``M = B x 64`` (the four UNet levels at 512 px), for ``B`` in 2, 16.

For each shape and each variant -- ``baseline`` (``F.linear`` writing ``(M, 2 I)``, then
``triton_kernels.geglu_triton``), ``gemm_only`` (``F.linear`` alone: what the dual GEMM's GEMM work costs in
cuBLAS, a floor for it), ``default`` (``geglu_linear_triton`` as it runs unasked: the TMA kernel of
``ldm_sdk.accel.geglu_tma`` with ``plan_tma``'s plan on Hopper, else the pointer kernel with
``plan_geglu_gemm``'s), ``pointer`` (the pointer kernel with ``plan_geglu_gemm``'s plan) and two dozen
alternative plans of both kernels (the TMA ones on Hopper only) -- the GPU time per call, median of
``--iters`` CUDA-event timings after warm-up: ``eager_us`` (one call between events) and ``graph_us`` (a CUDA
graph of ``--reps`` calls replayed, divided by ``--reps``: what the ops cost inside the captured UNet).
TFLOP/s counts ``2 M C 2I``; speedup is the baseline's time over the variant's (same mode). ``max_abs_err``:
against the float32 reference (``geglu_linear_reference``); ``ok``: within one output ulp + float32 noise of
it everywhere (``compare_ulps(...).within_bound``). A plan that fails to compile (shared memory, registers) is
reported with its error and skipped. The weight stays in L2 between timed calls (up to 26 MB at ``I = 5120``;
the UNet evicts it between uses), which flatters the small-``M`` shapes a little for every variant alike.

Summary: for each shape the fastest correct plan (graph time), and the sum of graph times over the shapes
for every plan that ran everywhere -- the candidates for ``TILE_SHAPES`` / ``plan_geglu_gemm``. About a
minute and a half on an H100 (mostly Triton compiles of the ~15 plan variants).

``--cpu-dry-run`` (with ``TRITON_INTERPRET=1``) exercises this script on the CPU: tiny shapes, wall-clock
timing, no graphs, no ``geglu_triton`` baseline kernel; numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel import geglu_gemm as G
from ldm_sdk.accel import geglu_tma as T
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.benchmarks import common as C

# (C, I, tokens per sample): M = batch x tokens
FF_SHAPES = [(320, 1280, 4096), (640, 2560, 1024), (1280, 5120, 256), (1280, 5120, 64)]
DRY_SHAPES = [(32, 64, 24), (48, 40, 9)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# block_m, block_n, block_k, num_warps, num_stages, group_m
SWEEP: list[tuple[int, int, int, int, int, int]] = [
    (128, 128, 64, 8, 3, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 32, 8, 4, 8),
    (128, 128, 64, 8, 3, 16),
    (256, 64, 64, 8, 3, 8),
    (128, 64, 64, 4, 4, 8),
    (128, 64, 64, 4, 3, 8),
    (128, 64, 64, 8, 4, 8),
    (128, 64, 128, 4, 3, 8),
    (64, 128, 64, 4, 4, 8),
    (64, 64, 64, 4, 4, 8),
    (64, 64, 128, 4, 3, 8),
]
DRY_SWEEP = [(16, 16, 16, 4, 2, 2), (32, 16, 32, 4, 2, 8)]
# the TMA kernel (Hopper): block_m, block_n, block_k, num_warps, stages, flatten, group_m
TMA_SWEEP: list[tuple[int, int, int, int, int, bool, int]] = [
    (128, 128, 64, 8, 3, False, 8),
    (128, 128, 64, 8, 4, False, 8),
    (128, 128, 64, 8, 3, True, 8),
    (128, 128, 64, 8, 4, True, 8),
    (128, 128, 64, 8, 5, True, 8),
    (128, 128, 64, 8, 3, False, 16),
    (128, 128, 64, 8, 4, True, 16),
    (128, 128, 32, 8, 4, False, 8),
    (256, 64, 64, 8, 3, False, 8),
    (128, 64, 64, 4, 3, False, 8),
    (64, 128, 64, 4, 3, False, 8),
]
DRY_TMA_SWEEP = [(32, 16, 16, 4, 2, False, 2), (32, 16, 16, 4, 2, True, 2)]


def graph_us(fn: Callable[[], object], reps: int, iters: int) -> float:
    """GPU time per call of ``fn`` replayed from a CUDA graph of ``reps`` calls (median of ``iters``)."""
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
    us = 1e6 * C.median(C.time_calls(graph.replay, torch.device("cuda"), 3, iters)) / reps
    del graph
    return us


def eager_us(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    return 1e6 * C.median(C.time_calls(fn, device, 5, iters))


def measure(
    fn: Callable[[], Tensor | None],
    ref: Tensor | None,
    flops: float,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Check ``fn``'s output against ``ref`` (when given), then time it eager and (on CUDA) graphed."""
    row: dict[str, Any] = {}
    out = fn()  # compiles
    if ref is not None and out is not None:
        report = K.compare_ulps(out, ref)
        row["max_abs_err"] = report.max_abs
        row["max_ulps"] = report.max_ulps
        row["ok"] = report.within_bound
    row["eager_us"] = eager_us(fn, device, args.iters)
    if device.type == "cuda":
        row["graph_us"] = graph_us(fn, args.reps, args.iters)
    best = row.get("graph_us", row["eager_us"])
    row["tflops"] = flops / (best * 1e-6) / 1e12
    return row


def plans(args: argparse.Namespace, tma: bool) -> list[G.GegluGemmPlan | T.TmaPlan]:
    table = DRY_SWEEP if args.cpu_dry_run else SWEEP
    out: list[G.GegluGemmPlan | T.TmaPlan] = [
        G.GegluGemmPlan(bm, bn, bk, w, s, group_m=g) for bm, bn, bk, w, s, g in table
    ]
    if tma:
        for bm, bn, bk, w, s, flat, g in DRY_TMA_SWEEP if args.cpu_dry_run else TMA_SWEEP:
            out.append(T.TmaPlan(bm, bn, bk, w, s, flatten=flat, group_m=g))
    return out


def make_variants(
    x: Tensor,
    w: Tensor,
    b: Tensor,
    pointer_plan: G.GegluGemmPlan,
    device: torch.device,
    args: argparse.Namespace,
) -> list[tuple[str, Callable[[], Tensor | None], bool]]:
    """(name, call, check against the reference) for the baseline, cuBLAS alone, the default (what runs
    unasked), the pointer kernel's default plan and the sweep."""
    out: list[tuple[str, Callable[[], Tensor | None], bool]] = []
    if device.type == "cuda":
        out.append(("baseline", lambda: K.geglu_triton(F.linear(x, w, b)), True))
    else:  # the interpreter would run geglu_triton too, but slowly: the reference stands in
        out.append(("baseline", lambda: K.geglu_reference(F.linear(x, w, b)), True))
    out.append(("gemm_only", lambda: F.linear(x, w, b), False))
    out.append(("default", lambda: G.geglu_linear_triton(x, w, b), True))
    out.append(("pointer", lambda: G.geglu_linear_triton(x, w, b, plan=pointer_plan), True))
    # the TMA kernel: on Hopper; in the dry run the interpreter runs it (fp16: its bf16 dot is wrong)
    tma = T.tma_fits(x, w) or (args.cpu_dry_run and x.dtype == torch.float16)
    if not args.no_sweep:
        for plan in plans(args, tma):

            def call(plan: G.GegluGemmPlan | T.TmaPlan = plan) -> Tensor:
                return G.geglu_linear_triton(x, w, b, plan=plan)

            out.append((plan.label(), call, True))
    return out


def fmt(row: dict[str, Any], key: str) -> str:
    if "error" in row:
        return "error"
    v = row.get(key)
    return "-" if v is None else f"{v:.1f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    p.add_argument("--iters", type=int, default=50, help="timed calls (or graph replays) per variant")
    p.add_argument("--reps", type=int, default=10, help="calls per captured graph")
    p.add_argument("--no-sweep", action="store_true", help="only the baseline and the default plan")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.cpu_dry_run:
        device = torch.device("cpu")
        shapes, args.iters = DRY_SHAPES, min(args.iters, 3)
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA device (or --cpu-dry-run with TRITON_INTERPRET=1)")
        device = torch.device("cuda")
        shapes = FF_SHAPES
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device.type == "cuda" else G.H100_SMS
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else C.cpu_name(),
        "sms": sms,
        "torch": torch.__version__,
        "triton": getattr(K.triton, "__version__", None),
        "dtype": args.dtype,
        "iters": args.iters,
        "reps": args.reps,
        "rows": [],
    }
    print(
        f"{res['device']} ({sms} SMs), torch {res['torch']}, triton {res['triton']}, {args.dtype}", flush=True
    )
    start = time.perf_counter()
    g = torch.Generator(device).manual_seed(0)
    head = f"{'B':>3} {'M':>6} {'C':>5} {'I':>5}  {'variant':<26} {'eager us':>9} {'graph us':>9} "
    head += f"{'TFLOP/s':>8} {'speedup':>7} {'max|err|':>9}  ok"
    with torch.inference_mode():
        for batch in args.batches:
            for channels, inner, tokens in shapes:
                m = batch * tokens
                x = torch.randn(m, channels, generator=g, device=device).to(dtype)
                w = (torch.randn(2 * inner, channels, generator=g, device=device) / math.sqrt(channels)).to(
                    dtype
                )
                b = (0.1 * torch.randn(2 * inner, generator=g, device=device)).to(dtype)
                with C.true_float32():
                    ref = G.geglu_linear_reference(x, w, b)
                flops = 2.0 * m * channels * 2 * inner
                pointer_plan = G.plan_geglu_gemm(m, inner, channels, sms=sms)
                default_plan = T.plan_tma(m) if T.tma_fits(x, w) else pointer_plan
                row: dict[str, Any] = {
                    "batch": batch,
                    "m": m,
                    "c": channels,
                    "inner": inner,
                    "default_plan": default_plan.label(),
                    "variants": {},
                }
                variants = make_variants(x, w, b, pointer_plan, device, args)
                print(head, flush=True)
                for name, fn, check in variants:
                    try:
                        v = measure(fn, ref if check else None, flops, device, args)
                    except Exception as exc:  # a plan the compiler refuses (resources), reported and skipped
                        v = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                    row["variants"][name] = v
                base = row["variants"]["baseline"]
                for name, v in row["variants"].items():
                    if "error" in v or "error" in base:
                        continue
                    for mode in ("eager_us", "graph_us"):
                        if mode in v:
                            v[f"speedup_{mode.removesuffix('_us')}"] = base[mode] / v[mode]
                    key = "graph_us" if "graph_us" in v else "eager_us"
                    label = name + (" *" if name == row["default_plan"] else "")
                    speed = v.get(f"speedup_{key.removesuffix('_us')}", float("nan"))
                    err = f"{v['max_abs_err']:.2e}" if "max_abs_err" in v else "-"
                    ok = "-" if "ok" not in v else ("yes" if v["ok"] else "NO")
                    print(
                        f"{batch:>3} {m:>6} {channels:>5} {inner:>5}  {label:<26} {fmt(v, 'eager_us'):>9} "
                        f"{fmt(v, 'graph_us'):>9} {v['tflops']:>8.1f} {speed:>7.2f} {err:>9}  {ok}",
                        flush=True,
                    )
                for name, v in row["variants"].items():
                    if "error" in v:
                        print(f"    {name}: {v['error']}", flush=True)
                key = "graph_us" if device.type == "cuda" else "eager_us"
                fused = {
                    n: v
                    for n, v in row["variants"].items()
                    if n not in ("baseline", "gemm_only") and "error" not in v and v.get("ok")
                }
                row["best"] = min(fused, key=lambda n: fused[n][key]) if fused else None
                if row["best"] is not None:
                    bv, dv = fused[row["best"]], row["variants"]["default"]
                    print(
                        f"    best {row['best']}: {bv[key]:.1f} us vs default ({default_plan.label()}) "
                        f"{dv.get(key, float('nan')):.1f} us, baseline {base.get(key, float('nan')):.1f} us",
                        flush=True,
                    )
                res["rows"].append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    key = "graph_us" if device.type == "cuda" else "eager_us"
    references = ("baseline", "gemm_only")  # timed whatever their accuracy (the baseline rounds twice)
    everywhere = set.intersection(
        *(
            {n for n, v in r["variants"].items() if "error" not in v and (n in references or v.get("ok"))}
            for r in res["rows"]
        )
    )
    totals = {n: sum(r["variants"][n][key] for r in res["rows"]) for n in everywhere}
    res["sum_us_by_variant"] = dict(sorted(totals.items(), key=lambda kv: kv[1]))
    res["elapsed_s"] = time.perf_counter() - start
    print(f"sum over shapes ({key}), best first:")
    for n, t in res["sum_us_by_variant"].items():
        print(f"    {n:<26} {t:10.1f}")
    print(f"elapsed {res['elapsed_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
