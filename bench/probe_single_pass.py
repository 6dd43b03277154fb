"""The single-pass GroupNorm kernel (one program per sample and group, the whole group in registers) at the
SD-1.5 UNet's small maps: the package's launch against the same kernel at other warps and against the
two-kernel path, timed in one run.

``bench/kernel_times.py`` put the kernel far from the card at batch 2 (9.9 us for a 16 x 16 x 1280 map,
1.3 MB; 4.0 us at 8 x 8): a group's channels start at ``g * CG``, and with ``CG`` (40 at 1280 channels) a
run-time integer Triton could not prove a group's row segment 16-byte aligned, so it loaded it element by
element. The kernel now takes ``CG`` as a ``tl.constexpr``, whose power-of-two factor proves the
alignment (8 channels, 16 bytes, at ``CG`` = 40). Candidates:

* ``pkg``: ``group_norm_act_triton(single_pass=True)``, the package's launch (its warps);
* ``cg_const_wN``: the package's kernel at ``N`` warps;
* ``two_kernels``: the package's statistics + apply kernels (``single_pass=False``).

``bench/results/probe_single_pass_h100.json`` was measured when ``pkg`` still took ``CG`` at run time and
the ``cg_const`` candidates were this script's copy of the kernel with ``CG`` a constexpr (commit 270bd11),
which the package then took over unchanged. Each (candidate, case) is checked against
``group_norm_act_reference`` (``compare_ulps``) and timed in a CUDA graph of repeated calls
(``tune_group_norm.graph_ms``); totals weight each case by how many of one UNet forward's norms have it.

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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tune_group_norm as T

from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.kernels.triton_kernels import _gn_single_pass_kernel


def cg_const_call(inp: T.Inputs, case: T.Case, warps: int) -> Callable[[], Tensor]:
    """The package's single-pass kernel (``CG`` a constexpr since session 11) launched at ``warps`` warps."""
    x = inp.xs[0]
    n, c, s = x.shape[0], x.shape[1], x.shape[2] * x.shape[3]
    cg = c // T.GROUPS
    y = torch.empty_like(x)
    sh = inp.shift if inp.shift is not None else x
    stride = inp.shift.stride(0) if inp.shift is not None else 0

    def call() -> Tensor:
        _gn_single_pass_kernel[(n * T.GROUPS,)](
            x, y, inp.w, inp.b, sh, c, s, T.GROUPS, c, 1, stride, float(case.eps),
            CG=cg, HAS_W=True, HAS_B=True, HAS_SHIFT=inp.shift is not None, ACT=case.act,
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
    **{f"cg_const_w{w}": (lambda inp, case, w=w: cg_const_call(inp, case, w)) for w in (2, 4, 8, 16, 32)},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16")
    p.add_argument(
        "--max-tile",
        type=int,
        default=None,
        help="also the norms whose padded group tile is at most this (default: the package's "
        "SINGLE_PASS_MAX; above it only the cg_const candidates and two_kernels run, outside the totals)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this probe needs a CUDA device")
    dev = torch.device("cuda")
    calls = T.unet_norm_calls()
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n in (int(b) for b in args.batches.split(",") if b):
        limit = args.max_tile or K.SINGLE_PASS_MAX
        counts = {
            case: k
            for case, k in T.case_counts(calls).items()
            if K.single_pass_tile(case.h * case.h, case.c // T.GROUPS) <= limit
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
                    continue
                row[name] = {"us": round(us, 2), "ok": report.ok(), "ulps": str(report)}
            # totals over the norms the package runs single-pass (above that, pkg refuses: per case only)
            within = K.single_pass_tile(case.h**2, case.c // T.GROUPS) <= K.SINGLE_PASS_MAX
            for name in CANDIDATES:
                if within:
                    totals[name] += count * row[name].get("us", float("nan"))
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
