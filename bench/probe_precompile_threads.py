"""Is the parallel pre-compilation of the fused kernels bound by Python's GIL? The SD-1.5 UNet's first-call
variants (batch 1 with guidance, 512 px: ``ldm_sdk.accel.precompile.precompile_kernels``) compiled from an
empty Triton cache with 16, 4, 8 and 1 threads, each in a fresh process; wall time of the compilation and
the process's own CPU time (the ``ptxas`` / C-compiler subprocesses are not in it). With ``--processes``:
the same on 16 / 8 worker processes (``ldm_sdk.kernels.compile_workers``) instead, threads for comparison,
and the first real call after each (it must find every kernel compiled).

    python bench/probe_precompile_threads.py bench/results/precompile_threads_h100.json
    python bench/probe_precompile_threads.py --processes bench/results/precompile_processes_h100.json
    python bench/probe_precompile_threads.py --modes 32:0,32:32 out.json     # threads:processes per run

H100 machine, 16 cores (``bench/results/precompile_threads_h100.json``): 21.0 s on one thread, 7.9 s on 4, 5.1
s on 8 and 4.9 s on 16 -- nearly flat from 8 threads while the process's CPU time grows from 12.9 to 22.6 s:
the in-process part of Triton's compiler holds the GIL for about 5 s of the 53 variants, so threads cannot go
below that (the compiler subprocesses, ``ptxas``, take the other ~8 s of one thread's 21). Compiling in worker
processes (Triton's on-disk cache carries the binaries back) is the way to a faster first image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(threads: int, processes: int = 0) -> dict[str, float]:
    import torch

    sys.path.insert(0, str(ROOT))
    from ldm_sdk.accel.precompile import precompile_kernels
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.benchmarks.common import random_sd15_unet

    unet = random_sd15_unet("cuda").half()
    prepare_cuda_inference(unet)
    x = torch.randn(1, 4, 64, 64, device="cuda").half().contiguous(memory_format=torch.channels_last)
    t = torch.full((1,), 501.0, device="cuda")
    ctx = torch.randn(2, 77, 768, device="cuda").half()  # the guidance halves sharing x
    torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    report = precompile_kernels([unet], lambda: unet(x, t, context=ctx), threads=threads, processes=processes)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    with torch.inference_mode():
        unet(x, t, context=ctx)
    torch.cuda.synchronize()
    return {
        "threads": threads,
        "processes": report.processes,
        "in_process": report.in_process,
        "wall_s": wall,
        "process_cpu_s": cpu,
        "variants": report.variants,
        "record_s": report.record_s,
        "compile_s": report.compile_s,
        "first_call_s": time.perf_counter() - start,
        "worker_s": report.worker_s,
        "slowest_s": report.slowest_s,
        "slowest": report.slowest,
        "load_s": report.load_s,
    }


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))), flush=True)
        return
    args = sys.argv[1:]
    modes = [(16, 0), (4, 0), (8, 0), (1, 0)]
    if "--processes" in args:
        modes = [(16, 0), (16, 16), (16, 8), (16, 0), (16, 16)]
    if "--modes" in args:  # threads:processes,...
        at = args.index("--modes")
        modes = [(int(a), int(b)) for a, b in (m.split(":") for m in args[at + 1].split(","))]
        args = args[:at] + args[at + 2 :]
    args = [a for a in args if a != "--processes"]
    rows = []
    for threads, processes in modes:
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="precompile_threads_")}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(threads), str(processes)],
            env=env,
            capture_output=True,
            text=True,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        failed = {"threads": threads, "processes": processes, "error": proc.stderr[-800:]}
        rows.append(json.loads(line[7:]) if line else failed)
        print(rows[-1], flush=True)
    if args:
        Path(args[0]).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
