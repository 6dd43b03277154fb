"""Tile-size sweep of the channels_last fused GroupNorm(+SiLU) kernels at the SD-1.5 UNet and kl-f8 decoder
shapes: the column tile (``NhwcTiles.cols``), the tile size (``max_block``), the programs aimed for
per SM, and the single-pass kernel (``_auto``: taken where the group fits) against the two kernels. For
each configuration: GPU time per call (replayed from a CUDA graph of 10 calls), effective bandwidth (two
reads and one write of the activation), and the ulp check against the float32 reference -- a
configuration that fails it is reported and never picked.

With ``--batch N`` the shapes are instead the SD-1.5 UNet's GroupNorm shapes (read off the model: every
ResBlock norm1 / norm2, SpatialTransformer norm and the output norm of one forward at 64 x 64 latents) at
batch N, each with SiLU without and with the per-(n, c) ``shift`` (ResBlock norm2), plus the transformer's
norm (no activation). Per shape it reports the default plan's time, the bytes it must move (two reads and a
write for the two kernels, one read and a write for the single-pass kernel), the achieved GB/s and its
fraction of ``--peak-gb-s``, the same for plain ``F.group_norm`` + ``F.silu`` (fp16, ``x + shift`` first),
the ulp check, and the totals over the norm calls of one UNet forward. ``--no-sweep`` skips the tile sweep.

    python bench/tune_group_norm.py --out tune_gn.json                        # on a CUDA machine
    python bench/tune_group_norm.py --batch 16 --no-sweep --out gn_b16.json   # UNet norms at batch 16
    TRITON_INTERPRET=1 python bench/tune_group_norm.py --cpu-dry-run          # code paths, tiny, on CPU

Timings replay a CUDA graph of repeated calls on the same input ("hot": what the previous call left in L2
stays there); ``--rotate`` cycles the calls over enough input / output copies that each call finds its
input out of L2 ("cold"), the DRAM-bound figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
GROUPS = 32
PEAK_GB_S = 3000.0  # achievable H100 SXM HBM3 bandwidth
L2_BYTES = 50 * 2**20  # H100 L2; --rotate keeps a call's buffers >= 3x this apart


# -- the UNet's norm calls -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormCall:
    """One GroupNorm of a UNet forward: channels, map side, activation, per-(n, c) shift, eps, where."""

    c: int
    h: int
    act: str
    shift: bool
    eps: float
    where: str

    @property
    def case(self) -> Case:
        return Case(self.c, self.h, self.act, self.shift, self.eps)


@dataclass(frozen=True, order=True)
class Case:
    """A distinct norm to time: (C, H = W, activation, shift, eps)."""

    c: int
    h: int
    act: str
    shift: bool
    eps: float

    @property
    def key(self) -> str:
        return f"C{self.c}_H{self.h}_{self.act}" + ("_shift" if self.shift else "")


def unet_norm_calls(latent: int = 64, unet_cfg: dict[str, Any] | None = None) -> list[NormCall]:
    """The GroupNorms one forward of the UNet (SD-1.5 by default) runs, in order, at ``latent`` x ``latent``
    latents: built on the meta device and walked in forward order (resamplers change the map side)."""
    from ldm_sdk.models.attention import SpatialTransformer
    from ldm_sdk.models.configs import UNetConfig
    from ldm_sdk.models.unet import Downsample, ResBlock, UNetModel, Upsample

    with torch.device("meta"):
        unet = UNetModel.from_config(UNetConfig(**(unet_cfg or C.SD15_UNET)))
    calls: list[NormCall] = []
    h = latent

    def walk(block: Any, where: str) -> None:
        nonlocal h
        for i, layer in enumerate(block):
            name = f"{where}.{i}"
            if isinstance(layer, ResBlock):
                n1, n2 = layer.in_layers[0], layer.out_layers[0]
                calls.append(NormCall(n1.num_channels, h, "silu", False, n1.eps, f"{name}.norm1"))
                if layer.updown:
                    h = h * 2 if isinstance(layer.h_upd, Upsample) else h // 2
                calls.append(NormCall(n2.num_channels, h, "silu", True, n2.eps, f"{name}.norm2"))
            elif isinstance(layer, SpatialTransformer):
                calls.append(
                    NormCall(layer.norm.num_channels, h, "none", False, layer.norm.eps, f"{name}.norm")
                )
            elif isinstance(layer, Downsample):
                h //= 2
            elif isinstance(layer, Upsample):
                h *= 2

    for i, blk in enumerate(unet.input_blocks):
        walk(blk, f"input_blocks.{i}")
    walk(unet.middle_block, "middle_block")
    for i, blk in enumerate(unet.output_blocks):
        walk(blk, f"output_blocks.{i}")
    out = unet.out[0]
    calls.append(NormCall(out.num_channels, h, "silu", False, out.eps, "out.0"))
    return calls


def case_counts(calls: Sequence[NormCall]) -> dict[Case, int]:
    counts: dict[Case, int] = {}
    for call in calls:
        counts[call.case] = counts.get(call.case, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[0].c * kv[0].h ** 2, kv[0])))


def step_total(calls: Sequence[NormCall], ms: dict[str, float]) -> float | None:
    """Sum of ``ms[case key]`` over the calls (None when a case has no timing)."""
    keys = [call.case.key for call in calls]
    return sum(ms[k] for k in keys) if all(k in ms for k in keys) else None


# -- inputs, byte model, timing ------------------------------------------------------------------------------
@dataclass
class Inputs:
    xs: list[Tensor]  # one or more copies of the activation (--rotate)
    w: Tensor
    b: Tensor
    shift: Tensor | None
    ref: Tensor  # float32 reference of xs[0], rounded once


def make_inputs(
    n: int, case: Case, device: torch.device, copies: int = 1, dtype: torch.dtype = torch.float16
) -> Inputs:
    g = torch.Generator(device).manual_seed(case.c * 1000 + case.h)
    shape = (n, case.c, case.h, case.h)

    def draw(*size: int) -> Tensor:
        return torch.randn(size, generator=g, device=device)

    # a non-zero mean per channel, as after a convolution (exercises the variance's cancellation)
    x0 = (draw(*shape) + 2.0 * draw(1, case.c, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last)
    xs = [x0] + [x0.clone() for _ in range(copies - 1)]
    w = (1.0 + 0.2 * draw(case.c)).to(dtype)
    b = (0.2 * draw(case.c)).to(dtype)
    shift = draw(n, case.c).to(dtype) if case.shift else None
    ref = K.group_norm_act_reference(x0, w, b, GROUPS, case.eps, case.act, shift=shift)  # type: ignore[arg-type]
    return Inputs(xs, w, b, shift, ref)


def copies_for(nbytes: int, rotate: bool) -> int:
    """Input copies so that consecutive reuses of one copy are >= 3 L2 sizes of traffic apart."""
    return min(64, max(2, math.ceil(3 * L2_BYTES / max(1, 2 * nbytes)))) if rotate else 1


def package_single_pass(n: int, c: int, h: int, groups: int = GROUPS) -> bool:
    """Whether ``group_norm_act_triton`` (``single_pass=None``) takes the single-pass kernel."""
    return K._pow2(h * h) * K._pow2(c // groups) <= K.SINGLE_PASS_MAX


def gn_bytes(x: Tensor, passes: int) -> int:
    """Activation bytes a GroupNorm must move: ``passes`` reads of x plus one write of y."""
    return (passes + 1) * x.numel() * x.element_size()


def graph_ms(fn: Callable[[], Any] | Sequence[Callable[[], Any]], reps: int = 10, iters: int = 30) -> float:
    """ms per call: a CUDA graph of ``reps`` calls (cycling over ``fn`` when it is a sequence, rounded up to
    a multiple of its length), replayed ``iters`` times (median); on CPU, one timed pass over the calls."""
    fns = list(fn) if isinstance(fn, Sequence) else [fn]
    reps = max(reps, len(fns))
    reps = math.ceil(reps / len(fns)) * len(fns)
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for f in fns:
            f()
        return 1e3 * (time.perf_counter() - t0) / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    ms = 1e3 * C.median(C.time_calls(graph.replay, torch.device("cuda"), 2, iters)) / reps
    del graph
    return ms


def torch_group_norm_act(
    x: Tensor, w: Tensor, b: Tensor, groups: int, eps: float, act: str, shift: Tensor | None
) -> Tensor:
    """The plain torch ops in the input dtype: ``x + shift``, ``F.group_norm``, ``F.silu``."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, groups, w, b, eps)
    return F.silu(y) if act == "silu" else y


def timing_row(ms: float, nbytes: int, peak: float) -> dict[str, float]:
    gb_s = nbytes / 1e9 / (ms / 1e3)
    return {"ms": ms, "us": 1e3 * ms, "gbytes": nbytes / 1e9, "gb_s": gb_s, "frac_peak": gb_s / peak}


def ulp_dict(report: K.UlpReport) -> dict[str, Any]:
    return {**asdict(report), "ok": report.ok(1e-4)}


# -- the sweep (today's behaviour) ---------------------------------------------------------------------------
def sweep(
    inp: Inputs, case: Case, sms: int, *, rotate: bool, reduced: bool = False
) -> tuple[dict[str, Any], str | None]:
    """Every (min cols, max block, programs per SM, single pass) configuration: ms, GB/s, ulp check."""
    x = inp.xs[0]
    gbytes = gn_bytes(x, 2) / 1e9
    timings: dict[str, Any] = {}
    grid = (
        itertools.product(MIN_COLS[:1], MAX_BLOCKS[:1], PER_SM[:1], SINGLE)
        if reduced
        else itertools.product(MIN_COLS, MAX_BLOCKS, PER_SM, SINGLE)
    )
    for cols, block, per_sm, single in grid:
        tiles = dataclasses.replace(
            K.NHWC_PLAIN if x.shape[0] < K.NHWC_PIPELINE_MIN_BATCH else K.NHWC_PIPELINED, cols=cols
        )
        calls = [
            functools.partial(
                K.group_norm_act_triton,
                xi,
                inp.w,
                inp.b,
                GROUPS,
                case.eps,
                case.act,  # type: ignore[arg-type]
                shift=inp.shift,
                target_programs=per_sm * sms,
                max_block=block,
                single_pass=single,
                nhwc=tiles,
            )
            for xi in inp.xs
        ]
        key = f"cols{cols}_block{block}_sm{per_sm}" + ("_auto" if single is None else "")
        try:
            report = K.compare_ulps(calls[0](), inp.ref)
            ms = graph_ms(calls if rotate else calls[0])
        except Exception as exc:  # a configuration the plan or compiler refuses
            timings[key] = {"error": str(exc).splitlines()[0][:120]}
            continue
        timings[key] = {"ms": ms, "gb_s": gbytes / (ms / 1e3), "ok": report.ok(1e-4)}
    ok = {k: v for k, v in timings.items() if v.get("ok")}
    best = min(ok, key=lambda k: ok[k]["ms"]) if ok else None
    return timings, best


def default_key(batch: int, sms_factor: int | None = None) -> str:
    tiles = K.NHWC_PIPELINED if batch >= K.NHWC_PIPELINE_MIN_BATCH else K.NHWC_PLAIN
    return f"cols{tiles.cols}_block{tiles.max_block}_sm{sms_factor or K.PROGRAMS_PER_SM}_auto"


def summarize_sweep(res: dict[str, Any]) -> None:
    totals: dict[str, float] = {}
    passing = [{k for k, v in r["configs"].items() if v.get("ok")} for r in res["rows"] if "configs" in r]
    everywhere = set.intersection(*passing) if passing else set()
    for row in res["rows"]:  # configurations that pass at every shape
        for k in everywhere if "configs" in row else ():
            totals[k] = totals.get(k, 0.0) + row["configs"][k]["ms"]
    res["sum_ms_by_config"] = dict(sorted(totals.items(), key=lambda kv: kv[1]))
    print("sum over shapes (ms), best first:", json.dumps(dict(list(res["sum_ms_by_config"].items())[:6])))


def run_legacy(res: dict[str, Any], sms: int, device: torch.device, rotate: bool) -> None:
    """Today's behaviour: the sweep over ``SHAPES`` (SiLU, with shift)."""
    for shape in SHAPES:
        n, c, h = shape[:3]
        case = Case(c, h, "silu", True, 1e-5)
        x_bytes = n * c * h * shape[3] * 2
        inp = make_inputs(n, case, device, copies_for(x_bytes, rotate))
        timings, best = sweep(inp, case, sms, rotate=rotate)
        now = default_key(n)
        res["rows"].append({"shape": list(shape), "default": now, "best": best, "configs": timings})
        ok = {k: v for k, v in timings.items() if v.get("ok")}
        if best is not None and now in ok:
            d, bb = ok[now], ok[best]
            print(
                f"{list(shape)}: default {d['ms'] * 1e3:.1f} us ({d['gb_s']:.0f} GB/s), "
                f"best {best} {bb['ms'] * 1e3:.1f} us ({bb['gb_s']:.0f} GB/s)",
                flush=True,
            )
    summarize_sweep(res)


# -- --batch: the UNet's norms ----------------------------------------------------------------------------
def batch_cases(calls: Sequence[NormCall]) -> list[Case]:
    """Every UNet (C, H) with SiLU, without and with shift, plus the transformer norms (no activation)."""
    shapes = sorted({(k.c, k.h) for k in (call.case for call in calls)}, key=lambda s: (-s[0] * s[1] ** 2, s))
    cases = [Case(c, h, "silu", shift, 1e-5) for c, h in shapes for shift in (False, True)]
    extra = sorted({call.case for call in calls} - set(cases), key=lambda k: (-k.c * k.h**2, k))
    return cases + extra


def run_batch(
    res: dict[str, Any],
    batch: int,
    sms: int,
    device: torch.device,
    *,
    rotate: bool,
    do_sweep: bool,
    peak: float,
    calls: Sequence[NormCall],
    max_cases: int | None = None,
) -> None:
    counts = case_counts(calls)
    res["unet_norm_calls"] = {k.key: v for k, v in counts.items()}
    pkg_ms: dict[str, float] = {}
    torch_ms: dict[str, float] = {}
    print(
        f"{'case':>24} {'n/step':>6} {'path':>6} {'us':>8} {'MB':>7} {'GB/s':>6} {'%peak':>6} "
        f"{'torch us':>9} {'GB/s':>6} {'ulp':>5} {'ok':>3}",
        flush=True,
    )
    for case in batch_cases(calls)[:max_cases]:
        x_bytes = batch * case.c * case.h**2 * 2
        inp = make_inputs(batch, case, device, copies_for(x_bytes, rotate))
        x = inp.xs[0]
        single = package_single_pass(batch, case.c, case.h)
        row: dict[str, Any] = {
            "case": case.key,
            "shape": [batch, case.c, case.h, case.h],
            "act": case.act,
            "shift": case.shift,
            "calls_per_step": counts.get(case, 0),
            "path": "single" if single else "two-pass",
        }
        calls_pkg = [
            functools.partial(
                K.group_norm_act_triton,
                xi,
                inp.w,
                inp.b,
                GROUPS,
                case.eps,
                case.act,  # type: ignore[arg-type]
                shift=inp.shift,
            )
            for xi in inp.xs
        ]
        try:
            report = K.compare_ulps(calls_pkg[0](), inp.ref)
            ms = graph_ms(calls_pkg if rotate else calls_pkg[0])
            row["package"] = {
                **timing_row(ms, gn_bytes(x, 1 if single else 2), peak),
                "ulps": ulp_dict(report),
            }
            pkg_ms[case.key] = ms
        except Exception as exc:
            row["package"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        calls_torch = [
            functools.partial(torch_group_norm_act, xi, inp.w, inp.b, GROUPS, case.eps, case.act, inp.shift)
            for xi in inp.xs
        ]
        try:
            t_report = K.compare_ulps(calls_torch[0](), inp.ref)
            t_ms = graph_ms(calls_torch if rotate else calls_torch[0])
            row["torch"] = {**timing_row(t_ms, gn_bytes(x, 2), peak), "ulps": ulp_dict(t_report)}
            torch_ms[case.key] = t_ms
        except Exception as exc:
            row["torch"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        if do_sweep and case.act == "silu":
            row["configs"], row["best"] = sweep(inp, case, sms, rotate=rotate, reduced=device.type != "cuda")
            row["default"] = default_key(x.shape[0])
        res["rows"].append(row)
        p, t = row["package"], row["torch"]
        print(
            f"{case.key:>24} {row['calls_per_step']:>6} {row['path'][:6]:>6} "
            + (
                f"{p['us']:8.1f} {p['gbytes'] * 1e3:7.1f} {p['gb_s']:6.0f} {100 * p['frac_peak']:5.1f}% "
                if "ms" in p
                else f"{'ERR':>8} {'':>7} {'':>6} {'':>6} "
            )
            + (f"{t['us']:9.1f} {t['gb_s']:6.0f} " if "ms" in t else f"{'ERR':>9} {'':>6} ")
            + (f"{p['ulps']['max_ulps']:5.2f} {'y' if p['ulps']['ok'] else 'N':>3}" if "ms" in p else ""),
            flush=True,
        )
        del inp, calls_pkg, calls_torch
    res["step_ms"] = {"package": step_total(calls, pkg_ms), "torch": step_total(calls, torch_ms)}
    print(f"one UNet forward ({len(calls)} GroupNorms, batch {batch}): {json.dumps(res['step_ms'])}")
    if do_sweep:
        summarize_sweep(res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--batch", type=int, default=None, help="the SD-1.5 UNet norm shapes at this batch")
    p.add_argument("--latent", type=int, default=64, help="latent side for --batch (64: 512 px)")
    p.add_argument("--no-sweep", action="store_true", help="with --batch: the default plan and torch only")
    p.add_argument("--rotate", action="store_true", help="cycle over input copies (cold L2)")
    p.add_argument("--peak-gb-s", type=float, default=PEAK_GB_S)
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="tiny UNet (64 ch, 8x8 latents), 6 cases, on CPU under TRITON_INTERPRET=1; the single-pass "
        "limit lowered to 64 so the two-kernel path runs too",
    )
    args = p.parse_args(argv)
    max_cases = None
    if args.cpu_dry_run:
        device = torch.device("cpu")
        sms = 1
        calls = unet_norm_calls(8, {**C.SD15_UNET, "model_channels": 64})
        batch = args.batch or 1
        max_cases = 6
        K.SINGLE_PASS_MAX = 64  # this process only: exercise the statistics + apply kernels
    else:
        device = torch.device("cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        calls = unet_norm_calls(args.latent)
        batch = args.batch
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET)",
        "torch": torch.__version__,
        "triton": getattr(K.triton, "__version__", None),
        "batch": batch,
        "rotate": args.rotate,
        "peak_gb_s": args.peak_gb_s,
        "rows": [],
    }
    with torch.inference_mode():
        if batch is None:
            run_legacy(res, sms, device, args.rotate)
        else:
            run_batch(
                res,
                batch,
                sms,
                device,
                rotate=args.rotate,
                do_sweep=not args.no_sweep,
                peak=args.peak_gb_s,
                calls=calls,
                max_cases=max_cases,
            )
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
