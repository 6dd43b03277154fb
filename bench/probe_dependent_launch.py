"""Does programmatic dependent launch shorten the gaps between our small kernels in a CUDA graph?

A chain of dependent copy-like Triton kernels (each reads what the previous one wrote) is captured in a CUDA
graph and replayed, at three sizes (16 K, 256 K and 4 M fp16 elements), launched plainly, as dependent
launches that wait for their inputs first (``griddepcontrol.wait``: what session 11's experiment had every
kernel of ``ldm_sdk.kernels`` do, ``bench/results/dependent_launch_experiment.diff``), and as
dependent launches that also let their successor start early (``griddepcontrol.launch_dependents`` after
their loads); then a cuBLAS GEMM and a kernel in turn, the kernel plain or dependent. Microseconds per
kernel (per pair for the GEMM chain), median of 20 replays; the chain's result is checked against the
same arithmetic in torch.

    python bench/probe_dependent_launch.py --out probe_dependent_launch.json    # Hopper or later
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _step_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + offs, mask=mask)
    if PDL and EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(y_ptr + offs, x * 0.5 + 1.0, mask=mask)


def per_kernel_us(n: int, chain: int, pdl: bool, early: bool, gemm: bool = False) -> float:
    bufs = [torch.zeros(n, device="cuda", dtype=torch.float16) for _ in range(2)]
    a = torch.randn(512, 512, device="cuda", dtype=torch.float16)
    mm = torch.empty(512, 512, device="cuda", dtype=torch.float16)
    grid = (triton.cdiv(n, 1024),)

    def once() -> None:
        for i in range(chain):
            if gemm:
                torch.mm(a, a, out=mm)
            _step_kernel[grid](
                bufs[i % 2],
                bufs[(i + 1) % 2],
                n,
                BLOCK=1024,
                PDL=pdl,
                EARLY=early,
                launch_pdl=pdl,
                num_warps=4,
            )

    once()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    bufs[0].zero_()
    with torch.cuda.graph(graph):
        once()
    bufs[0].zero_()
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.zeros(n, device="cuda", dtype=torch.float16)
    for _ in range(chain):
        expected = expected * 0.5 + 1.0
    if not torch.equal(bufs[chain % 2], expected):
        raise AssertionError(f"the chain's result is wrong (n={n}, pdl={pdl}, early={early})")
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / chain)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        p.error("this probe needs a CUDA device of compute capability 9.0 or later")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for n in (16384, 262144, 4 * 1024 * 1024):
        for pdl, early in ((False, False), (True, False), (True, True)):
            us = per_kernel_us(n, 200, pdl, early)
            res[f"n{n}_pdl{int(pdl)}_early{int(early)}_us"] = round(us, 3)
            print(f"n={n} dependent={pdl} early={early}: {us:.3f} us per kernel", flush=True)
    for pdl in (False, True):
        us = per_kernel_us(262144, 100, pdl, False, gemm=True)
        res[f"gemm_then_kernel_pdl{int(pdl)}_us"] = round(us, 3)
        print(f"GEMM + kernel, dependent={pdl}: {us:.3f} us per pair", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
