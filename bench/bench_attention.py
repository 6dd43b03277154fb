"""The Triton flash attention (``ldm_sdk.accel.attention_kernel``) against SDPA at the SD-1.5 UNet attention
shapes, batch 2 and 16 (512 px with guidance; a batch of 8 images): self-attention over 4096 / 1024 / 256 /
64 tokens with head dims 40 / 80 / 160 / 160 (8 heads) and cross-attention of the same queries over 77 text
tokens.

For each shape: SDPA with its default backend choice and with each of cuDNN / flash / efficient forced
(``torch.nn.attention.sdpa_kernel``; unsupported ones are listed as such), and the Triton kernel with its
default plan (``plan_attention``) and a sweep of up to 20 alternative plans (tiles, warps, stages; the
default tiles with the head dim padded to one power-of-two chunk, what the library kernels do; and, on the
long self-attentions, the ``AttentionPlan`` options: part of the exponentials in software (``exp_emu``,
``exp_deg``) and the lazy rescale (``lazy_rescale``)) -- GPU time per call (the median over ``--iters``
replays of a CUDA graph of 10 calls, timed with CUDA events: the UNet step runs as a CUDA graph, and eager
timing of the small shapes would measure the Python launch), real-work TFLOP/s (``4 B H Nq Nk D / t``, no
padding counted), speedup against the fastest SDPA backend, and the largest error relative to the largest
output of the float32 reference (``attention_reference`` on the inputs cast to float32); ``WRONG?`` marks
a plan whose error is far above SDPA's (a miscompile, not rounding). The summary estimates the attention
time of one UNet step (5 transformer blocks at each of 64x64, 32x32, 16x16, one at 8x8; one self- and one
cross-attention each). The inputs are ``view(b, n, h, d).transpose(1, 2)`` views of a fused QKV (self) or
Q / fused KV (cross) projection output, as the model passes them.

Robustness: every shape runs in a fresh subprocess (the kernel variants it needs are compiled first, in
parallel; Triton's disk cache serves later processes). A CUDA fault (an illegal memory access kills the
CUDA context) ends that process only: the driver records the plan that was running as faulted and resumes
the shape without it in a new process, so one faulting plan hides no other result. ``--in-process`` runs
everything in one process and stops at the first fault, naming it.

    python bench/bench_attention.py --out bench_attention.json        # on a CUDA machine (~3 min on H100)
    python bench/bench_attention.py --quick                          # default plan only, batch 2
    python bench/bench_attention.py --shapes cross_64x64_b2 --plans w4_s3 --no-sdpa   # one plan, one shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel import attention_kernel as A
from ldm_sdk.accel.precompile import _compile, _variant
from ldm_sdk.accel.triton_kernels import KernelRecorder, Launch
from ldm_sdk.benchmarks import common as C

HEADS = 8
#: (level, tokens, head dim, transformer blocks at that level in the SD-1.5 UNet)
LEVELS = (("64x64", 4096, 40, 5), ("32x32", 1024, 80, 5), ("16x16", 256, 160, 5), ("8x8", 64, 160, 1))
TEXT_TOKENS = 77
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}
#: alternative (block_m, block_n, num_warps, num_stages) with the default head-dim chunks
TILES = (
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 2),
    (128, 64, 8, 4),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 8, 2),
    (64, 128, 8, 2),
    (64, 32, 4, 3),
)
#: (tiles or None for the default's, exp_emu, exp_deg, lazy_rescale): the exp2 / rescale options, swept on
#: the long self-attentions (at least 8 key blocks), where the exponentials bound the kernel
OPTIONS = (
    (None, 4, 5, 0),
    (None, 4, 3, 0),
    (None, 2, 5, 0),
    (None, 0, 5, 8),
    (None, 4, 5, 8),
    ((128, 128, 8, 2), 4, 5, 0),
    ((128, 128, 8, 3), 4, 5, 8),
    ((128, 128, 8, 2), 2, 5, 8),
)
MAX_ALTERNATIVES = 20
CALLS_PER_GRAPH = 10
WORKER_TIMEOUT_S = 240
MAX_RESTARTS = 24


def shapes(batches: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for b in batches:
        for level, n, d, blocks in LEVELS:
            for kind, nk in (("self", n), ("cross", TEXT_TOKENS)):
                out.append(
                    {"name": f"{kind}_{level}_b{b}", "b": b, "nq": n, "nk": nk, "d": d, "blocks": blocks}
                )
    return out


def make_inputs(s: dict[str, Any], dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Views of projection outputs, as ``CrossAttention.attend`` makes them."""
    b, nq, nk, d = s["b"], s["nq"], s["nk"], s["d"]
    inner = HEADS * d

    def heads(t: Tensor, n: int) -> Tensor:
        return t.view(b, n, HEADS, d).transpose(1, 2)

    if nq == nk:
        qkv = torch.randn(b, nq, 3 * inner, generator=g, device="cuda", dtype=dtype)
        return (
            heads(qkv[..., :inner], nq),
            heads(qkv[..., inner : 2 * inner], nk),
            heads(qkv[..., 2 * inner :], nk),
        )
    q = torch.randn(b, nq, inner, generator=g, device="cuda", dtype=dtype)
    kv = torch.randn(b, nk, 2 * inner, generator=g, device="cuda", dtype=dtype)
    return heads(q, nq), heads(kv[..., :inner], nk), heads(kv[..., inner:], nk)


def plans(s: dict[str, Any], quick: bool, sm_count: int) -> dict[str, A.AttentionPlan]:
    """The default plan first (labelled ``default <plan>``), then the sweep: tiles / warps / stages, the
    head dim padded to one power-of-two chunk (what the library kernels do), and on long self-attentions
    the exp2 / rescale options (distinct plans only)."""
    default = A.plan_attention(s["nq"], s["nk"], s["d"], batch_heads=s["b"] * HEADS, sms=sm_count)
    found = {f"default {default}": default}
    if quick:
        return found
    d0, d1 = default.d0, default.d1
    candidates = [A.AttentionPlan(bm, bn, d0, d1, w, st) for bm, bn, w, st in TILES]
    padded = max(16, 1 << (s["d"] - 1).bit_length())
    if (d0, d1) != (padded, 0):
        candidates.append(A.AttentionPlan(default.block_m, default.block_n, padded, 0, default.num_warps, 2))
    if s["nk"] >= 8 * default.block_n:
        for tiles, emu, deg, lazy in OPTIONS:
            bm, bn, w, st = tiles or (default.block_m, default.block_n, default.num_warps, default.num_stages)
            candidates.append(
                A.AttentionPlan(bm, bn, d0, d1, w, st, exp_emu=emu, exp_deg=deg, lazy_rescale=lazy)
            )
    for plan in candidates:
        if plan != default and len(found) <= MAX_ALTERNATIVES:
            found.setdefault(str(plan), plan)
    return found


def sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def graph_us(fn: Callable[[], object], iters: int) -> float:
    """GPU microseconds per call: a CUDA graph of ``CALLS_PER_GRAPH`` calls, median replay / calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn()
    return 1e6 * C.median(C.time_calls(graph.replay, torch.device("cuda"), 3, iters)) / CALLS_PER_GRAPH


def eager_us(fn: Callable[[], object], iters: int) -> float:
    return 1e6 * C.median(C.time_calls(fn, torch.device("cuda"), 5, iters))


def precompile(s: dict[str, Any], found: dict[str, A.AttentionPlan], inputs: tuple[Tensor, ...]) -> float:
    """Record one launch per plan, compile the distinct kernel variants in parallel; seconds."""
    recorder = KernelRecorder()
    q, k, v = inputs
    for plan in found.values():
        A.flash_attention_triton(q, k, v, plan=plan, recorder=recorder)
    unique = list({_variant(rec): rec for rec in recorder.launches}.values())
    start = time.perf_counter()

    def compile_one(rec: Launch) -> None:
        try:
            _compile(rec)
        except Exception as exc:  # reported again when the plan is timed
            print(f"compile failed for {rec.kwargs}: {str(exc).splitlines()[0][:100]}", flush=True)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(compile_one, unique))
    took = time.perf_counter() - start
    print(f"{s['name']}: compiled {len(unique)} kernel variants in {took:.1f} s", flush=True)
    return took


class CudaFault(RuntimeError):
    """A CUDA error (illegal address, launch failure): the context is dead, the process must end."""


def _is_cuda_fault(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "CUDA error" in text or "AcceleratorError" in text or "cudaError" in text or "CUDA_ERROR" in text


def measure(fn: Callable[[], Tensor], ref: Tensor, flops: float, iters: int, eager: bool) -> dict[str, Any]:
    """Time ``fn`` (graph replays; plain calls with ``eager`` or where capture fails) and its error; a CUDA
    fault (illegal access ...) raises :class:`CudaFault` (the context is dead after one)."""
    timing = "eager" if eager else "graph"
    try:
        out = fn()
        torch.cuda.synchronize()  # a fault of this very launch surfaces here, not at a later call
        err = C.rel_err(out, ref)
    except Exception as exc:  # an unsupported backend, a plan that does not fit the SM's resources
        if _is_cuda_fault(exc):
            raise CudaFault(str(exc).splitlines()[0][:200]) from exc
        return {"error": str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}
    try:
        us = eager_us(fn, iters) if eager else graph_us(fn, iters)
    except Exception as exc:
        if _is_cuda_fault(exc):
            raise CudaFault(str(exc).splitlines()[0][:200]) from exc
        torch.cuda.synchronize()
        print(f"  (graph capture failed, timing eagerly: {str(exc).splitlines()[0][:100]})", flush=True)
        timing = "eager"
        us = eager_us(fn, iters)
    return {"us": us, "tflops": flops / (us * 1e-6) / 1e12, "max_rel_err": err, "timing": timing}


def sdpa_call(q: Tensor, k: Tensor, v: Tensor, backend: SDPBackend | None) -> Callable[[], Tensor]:
    def call() -> Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return call


def triton_call(q: Tensor, k: Tensor, v: Tensor, plan: A.AttentionPlan) -> Callable[[], Tensor]:
    def call() -> Tensor:
        return A.flash_attention(q, k, v, backend="triton", plan=plan)

    return call


def _selected(label: str, filters: list[str] | None) -> bool:
    return not filters or any(f in label for f in filters)


def run_shape(
    s: dict[str, Any], args: argparse.Namespace, skip: set[str], partial: Path | None
) -> dict[str, Any]:
    """Measure one shape (SDPA backends, then the plans not in ``skip``); the row is rewritten to
    ``partial`` after every measurement, with ``running`` naming the implementation under way, so that a
    CUDA fault (which ends the process) leaves what was measured and which plan faulted."""
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    g = torch.Generator("cuda").manual_seed(0)
    found = {
        label: plan for label, plan in plans(s, args.quick, sms()).items() if _selected(label, args.plans)
    }
    flops = 4.0 * s["b"] * HEADS * s["nq"] * s["nk"] * s["d"]
    row: dict[str, Any] = {**s, "flops": flops, "sdpa": {}, "triton": {}, "running": None}
    row["plans"] = {label: dataclasses.asdict(plan) for label, plan in found.items()}
    row["default_plan"] = next((label for label in found if label.startswith("default")), None)

    def save() -> None:
        if partial is not None:
            partial.write_text(json.dumps(row))

    with torch.inference_mode():
        q, k, v = make_inputs(s, dtype, g)
        ref = A.attention_reference(q.float(), k.float(), v.float())
        todo = {label: plan for label, plan in found.items() if label not in skip}
        if todo and not args.no_precompile:
            row["compile_s"] = precompile(s, todo, (q, k, v))
        if not args.no_sdpa:
            for name, backend in {"default": None, **SDPA_BACKENDS}.items():
                if f"sdpa {name}" in skip:
                    continue
                row["running"] = f"sdpa {name}"
                save()
                row["sdpa"][name] = measure(sdpa_call(q, k, v, backend), ref, flops, args.iters, args.eager)
        for label, plan in todo.items():
            row["running"] = label
            save()
            row["triton"][label] = measure(triton_call(q, k, v, plan), ref, flops, args.iters, args.eager)
        row["running"] = None
        save()
    return row


def print_row(row: dict[str, Any]) -> None:
    sdpa, ours = row["sdpa"], row["triton"]
    timed_sdpa = {n: r for n, r in sdpa.items() if "us" in r}
    best_sdpa = min(timed_sdpa, key=lambda n: timed_sdpa[n]["us"]) if timed_sdpa else None
    timed = {n: r for n, r in ours.items() if "us" in r}
    best = min(timed, key=lambda n: timed[n]["us"]) if timed else None
    row["best_sdpa"], row["best_plan"] = best_sdpa, best
    base_us = timed_sdpa[best_sdpa]["us"] if best_sdpa else math.nan
    sdpa_err = min((r["max_rel_err"] for r in timed_sdpa.values()), default=math.nan)
    # a plan is flagged when its error is far above SDPA's (a miscompile reading garbage, not rounding)
    limit = max(4 * sdpa_err, 4e-3) if sdpa_err == sdpa_err else 4e-3
    print(f"\n{'shape':<20} {'implementation':<44} {'us':>9} {'TFLOP/s':>8} {'vs SDPA':>8} {'rel err':>9}")
    for group, results in (("sdpa ", sdpa), ("", ours)):
        for name, r in results.items():
            label = f"{group}{name}" + (" *" if name in (best, best_sdpa) else "")
            if "us" not in r:
                print(f"{row['name']:<20} {label:<44} {r['error'][:70]}")
                continue
            bad = "  WRONG?" if r["max_rel_err"] > limit else ""
            r["suspect"] = bool(bad)
            print(
                f"{row['name']:<20} {label:<44} {r['us']:>9.1f} {r['tflops']:>8.1f} "
                f"{base_us / r['us']:>7.2f}x {r['max_rel_err']:>9.2e}{bad}",
                flush=True,
            )


def worker(args: argparse.Namespace) -> None:
    """One shape in this process (``--worker NAME``); exit status 3 after a CUDA fault."""
    s = next(s for s in shapes((2, 16, *(args.batch or ()))) if s["name"] == args.worker)
    skip = set(args.skip or ())
    partial = args.worker_out
    try:
        run_shape(s, args, skip, partial)
    except CudaFault as exc:
        print(f"CUDA FAULT in {s['name']}: {exc}", flush=True)
        sys.stdout.flush()
        os._exit(3)  # the context is dead: no teardown through it


def driver(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Every shape in fresh subprocesses (``--worker``): a plan that faults is recorded as such and the
    shape is resumed without it in a new process, so one fault hides no other result."""
    batches = tuple(args.batch) if args.batch else ((2,) if args.quick else (2, 16))
    todo = [s for s in shapes(batches) if _selected(s["name"], args.shapes)]
    passthrough = [a for a in argv if a not in ("--in-process",)]
    passthrough = _strip_option(passthrough, "--out", 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in todo:
            row: dict[str, Any] | None = None
            skip: list[str] = []
            faults: dict[str, str] = {}
            for _ in range(MAX_RESTARTS):
                out = Path(tmp) / f"{s['name']}.json"
                out.unlink(missing_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", s["name"],
                       "--worker-out", str(out), *(["--skip", *skip] if skip else [])]  # fmt: skip
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
                    rc, text = proc.returncode, proc.stdout + proc.stderr
                except subprocess.TimeoutExpired as exc:
                    rc, text = -1, f"timed out after {WORKER_TIMEOUT_S} s: {exc}"
                for line in text.splitlines():
                    if "compiled" in line or "FAULT" in line or "compile failed" in line:
                        print(line, flush=True)
                part = json.loads(out.read_text()) if out.exists() else None
                if row is None:
                    row = part
                elif part is not None:  # merge what the resumed process measured
                    row["sdpa"].update(part["sdpa"])
                    row["triton"].update(part["triton"])
                if rc == 0 or part is None:
                    if rc != 0:
                        print(f"{s['name']}: worker failed (rc {rc}) before measuring:\n{text[-2000:]}")
                    break
                culprit = part.get("running")
                if culprit is None:
                    print(f"{s['name']}: worker failed (rc {rc}) after the last plan:\n{text[-1000:]}")
                    break
                reason = next((ln for ln in text.splitlines() if "FAULT" in ln), f"process died (rc {rc})")
                faults[culprit] = reason
                print(f"{s['name']}: {culprit} FAILED -- {reason}; resuming without it", flush=True)
                group = "sdpa" if culprit.startswith("sdpa ") else "triton"
                assert row is not None
                row[group][culprit.removeprefix("sdpa ") if group == "sdpa" else culprit] = {
                    "error": f"CUDA fault: {reason}"
                }
                skip = sorted({*skip, *row["triton"], *(f"sdpa {n}" for n in row["sdpa"]), culprit})
            if row is not None:
                row["faults"] = faults
                print_row(row)
                rows.append(row)
    return _finish(args, rows)


def _strip_option(argv: list[str], name: str, values: int) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == name:
            i += 1 + values
            continue
        if argv[i].startswith(name + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    """All shapes in this process (``--in-process``); stops at the first CUDA fault with a clear message."""
    batches = tuple(args.batch) if args.batch else ((2,) if args.quick else (2, 16))
    rows = []
    for s in shapes(batches):
        if not _selected(s["name"], args.shapes):
            continue
        try:
            row = run_shape(s, args, set(), None)
        except CudaFault as exc:
            sys.exit(f"CUDA FAULT in {s['name']} ({exc}); the CUDA context is dead, stopping. Rerun without "
                     "--in-process (one process per shape) to see the other results.")  # fmt: skip
        print_row(row)
        rows.append(row)
    return _finish(args, rows)


def _finish(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import triton

    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "sms": sms(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": args.dtype,
        "timing": "eager calls" if args.eager else f"CUDA graph of {CALLS_PER_GRAPH} calls",
        "iters": args.iters,
        "rows": rows,
    }
    res["step_estimate_us"] = step_estimate(rows)
    print("\nattention per UNet step (us): " + json.dumps(res["step_estimate_us"], indent=1))
    faults = {row["name"]: row.get("faults") for row in rows if row.get("faults")}
    suspects = [f"{row['name']} {n}" for row in rows for n, r in row["triton"].items() if r.get("suspect")]
    print("CUDA faults: " + (json.dumps(faults, indent=1) if faults else "none"))
    print("plans with an error far above SDPA's: " + (", ".join(suspects) if suspects else "none"))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 2 16)")
    p.add_argument("--iters", type=int, default=50, help="timed graph replays (or calls) per variant")
    p.add_argument("--quick", action="store_true", help="the default plan only (and batch 2 unless --batch)")
    p.add_argument("--eager", action="store_true", help="time plain calls instead of CUDA-graph replays")
    p.add_argument("--shapes", nargs="+", default=None, help="only shapes whose name contains one of these")
    p.add_argument("--plans", nargs="+", default=None, help="only plans whose label contains one of these")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baselines")
    p.add_argument("--no-precompile", action="store_true", help="compile each variant at its first call")
    p.add_argument("--in-process", action="store_true", help="one process for everything (stops at a fault)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--skip", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    if args.worker:
        worker(args)
        return None
    return in_process(args) if args.in_process else driver(args, argv)


def step_estimate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per batch size: the attention time of one UNet step with the best SDPA backend, the default-plan
    kernel and the best plan per shape (blocks per level x (self + cross))."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        est = out.setdefault(f"b{row['b']}", {"best_sdpa": 0.0, "sdpa_default": 0.0, "triton_default": 0.0,
                                              "triton_best": 0.0})  # fmt: skip
        picks = {
            "best_sdpa": row["sdpa"].get(row.get("best_sdpa") or "", {}),
            "sdpa_default": row["sdpa"].get("default", {}),
            "triton_default": row["triton"].get(row.get("default_plan") or "", {}),
            "triton_best": row["triton"].get(row.get("best_plan") or "", {}),
        }
        for key, r in picks.items():
            est[key] += row["blocks"] * r.get("us", math.nan)
    return out


if __name__ == "__main__":
    main()
