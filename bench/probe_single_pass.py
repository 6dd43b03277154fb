"""The single-pass GroupNorm kernel (one program per sample and group, the whole group in registers) at the
SD-1.5 UNet's small maps, against candidate forms of it, timed in one run.

``bench/kernel_times.py`` put it far from the card at batch 2: 9.9 us for a 16 x 16 x 1280 map (1.3 MB)
and 4.0 us at 8 x 8. A group's channels start at ``g * CG`` with ``CG`` a run-time integer (40 at 1280
channels), so Triton cannot prove a group's row segment 16-byte aligned and loads it element by element.
The candidates (standalone here, the package's maths: float32 mean, then the variance of the centred tile,
``(x - mean) * rstd * w + b``, SiLU, one rounding):

* ``cg_const_wN``: ``CG`` a ``tl.constexpr`` (its power-of-two factor then proves each segment's
  alignment: 8 channels, 16 bytes, at ``CG`` = 40), ``N`` warps;
* ``two_kernels``: the package's statistics + apply kernels (``single_pass=False``);
* ``pkg``: the package's single-pass kernel as it is.

Each (candidate, case) is checked against ``group_norm_act_reference`` (``compare_ulps``) and timed in a
CUDA graph of repeated calls (``tune_group_norm.graph_ms``); totals weight each case by how many of one
UNet forward's norms have it.

    python bench/probe_single_pass.py --batches 2,16 --out probe_single_pass.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_group_norm as T

from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.kernels.triton_kernels import _activate


@triton.jit(do_not_specialize=["G", "SHIFT_STRIDE"])
def _single_pass_cg_const_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    shift_ptr,
    C,
    S,
    G,
    SHIFT_STRIDE,
    eps,
    CG: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    """channels_last only: program ``n G + g`` normalises group g of sample n, element (s, j) at
    ``n S C + s C + g CG + j``."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // G
    j = tl.arange(0, BLOCK_CG)
    c = (pid % G) * CG + j
    rows = tl.arange(0, BLOCK_S)
    col_ok = j < CG
    valid = (rows < S)[:, None] & col_ok[None, :]
    idx = n * C * S + rows[:, None].to(tl.int64) * C + c[None, :]
    x = tl.load(x_ptr + idx, mask=valid, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x = x + tl.load(shift_ptr + n * SHIFT_STRIDE + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = tl.where(valid, x, 0.0)
    count = (S * CG).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(valid, x - mean, 0.0)
    var = tl.sum(tl.sum(d * d, axis=1), axis=0) / count
    scale = tl.full([BLOCK_CG], 1.0, tl.float32) / tl.sqrt_rn(var + eps)
    scale = scale * tl.load(w_ptr + c, mask=col_ok, other=1.0).to(tl.float32)
    beta = tl.load(b_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
    y = _activate(d * scale[None, :] + beta[None, :], ACT)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=valid)


def cg_const_call(inp: T.Inputs, case: T.Case, warps: int) -> Callable[[], Tensor]:
    x = inp.xs[0]
    n, c, s = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    cg = c // T.GROUPS
    y = torch.empty_like(x)
    sh = inp.shift if inp.shift is not None else x
    stride = inp.shift.stride(0) if inp.shift is not None else 0

    def call() -> Tensor:
        _single_pass_cg_const_kernel[(n * T.GROUPS,)](
            x, y, inp.w, inp.b, sh, c, s, T.GROUPS, stride, float(case.eps),
            CG=cg, HAS_SHIFT=inp.shift is not None, ACT=case.act,
            BLOCK_S=K._pow2(s), BLOCK_CG=K._pow2(cg), num_warps=warps,
        )  # fmt: skip
        return y

    return call


def package_call(inp: T.Inputs, case: T.Case, single_pass: bool) -> Callable[[], Tensor]:
    def call() -> Tensor:
        return K.group_norm_act_triton(
            inp.xs[0], inp.w, inp.b, T.GROUPS, case.eps, case.act, shift=inp.shift, single_pass=single_pass
        )

    return call


CANDIDATES: dict[str, Callable[[T.Inputs, T.Case], Callable[[], Tensor]]] = {
    "pkg": lambda inp, case: package_call(inp, case, True),
    "two_kernels": lambda inp, case: package_call(inp, case, False),
    **{f"cg_const_w{w}": (lambda inp, case, w=w: cg_const_call(inp, case, w)) for w in (2, 4, 8, 16)},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this probe needs a CUDA device")
    dev = torch.device("cuda")
    calls = T.unet_norm_calls()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n in (int(b) for b in args.batches.split(",") if b):
        counts = {
            case: k for case, k in T.case_counts(calls).items() if T.package_single_pass(n, case.c, case.h)
        }
        rows: dict[str, Any] = {}
        totals = dict.fromkeys(CANDIDATES, 0.0)
        for case, count in counts.items():
            inp = T.make_inputs(n, case, dev)
            row: dict[str, Any] = {"count": count}
            for name, make in CANDIDATES.items():
                try:
                    fn = make(inp, case)
                    out = fn()
                    report = K.compare_ulps(out, inp.ref)
                    us = 1e3 * T.graph_ms(fn)
                except Exception as e:  # a candidate that fails is reported, not fatal
                    row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    totals[name] = float("nan")
                    continue
                row[name] = {"us": round(us, 2), "ok": report.ok(), "ulps": str(report)}
                totals[name] += count * us
            rows[case.key] = row
            print(
                n,
                case.key,
                count,
                {k: v.get("us", "err") for k, v in row.items() if k != "count"},
                flush=True,
            )
        res[f"b{n}"] = {"cases": rows, "total_us": {k: round(v, 1) for k, v in totals.items()}}
        print(f"b{n} totals", res[f"b{n}"]["total_us"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
