"""The sampling benchmark's command-line options, without importing torch (``ldm-sdk --help`` builds every
command's parser). :mod:`ldm_sdk.benchmarks.sampling` runs them; ``bench/bench_sampling.py`` and
``ldm-sdk bench`` share them.
"""

from __future__ import annotations

import argparse

#: ``--arch`` values: the keys of :data:`ldm_sdk.benchmarks.common.ARCHS` (a test keeps them equal)
ARCH_NAMES = ("cin256", "ldm-kl8", "sd15")
#: ``--size`` values: the keys of :data:`ldm_sdk.benchmarks.common.SIZES`
SIZE_NAMES = ("ci", "full", "small")
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (``bench/bench_sampling.py`` and ``ldm-sdk bench`` share them)."""
    p.add_argument("--arch", choices=ARCH_NAMES, default="sd15")
    p.add_argument(
        "--size",
        choices=SIZE_NAMES,
        default="full",
        help="small: width-shrunk CPU smoke (8 heads: head dims 8/16/32); ci: the same with 2 heads "
        "(head dims 32/64/128, nearer SD-1.5's 40/80/160), the CPU comparison size",
    )
    p.add_argument("--device", default=None, help="default cuda where available, else cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument(
        "--steps", type=int, default=None, help="DDIM steps (default 50; 10 with --size small / ci)"
    )
    p.add_argument("--batch-sizes", default=None, help="end-to-end batch sizes (default 1,8; small 1,2)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd UNets (both engines)")
    p.add_argument(
        "--fast",
        action="store_true",
        help="ours only: CUDA-graph replay of the UNet call on cuda; bf16 where native, channels_last and "
        "threads on cpu (ldm_sdk.accel). diffusers stays eager",
    )
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--iters", type=int, default=None, help="timed UNet/VAE calls (default 20 cuda, 3 cpu)")
    p.add_argument("--e2e-repeats", type=int, default=None, help="timed e2e runs (default 3 cuda, 1 cpu)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="nominal peak for MFU (default: 989 on cuda)"
    )
    p.add_argument("--no-cold", action="store_true", help="skip the cold time-to-first-image subprocesses")
    p.add_argument(
        "--cold-repeats", type=int, default=None, help="fresh processes per engine (2 cuda, 1 cpu)"
    )
    p.add_argument("--no-diffusers", action="store_true", help="time ours only")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on shared cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write everything as JSON here")
    p.add_argument(
        "--cpu-compare",
        action="store_true",
        help="CPU: ours eager fp32, ours on the CPU fast path, diffusers fp32 and diffusers bf16 + "
        "channels_last in one process, measured round-robin with the load average of every measurement",
    )
    p.add_argument(
        "--with-compiled",
        action="store_true",
        help="with --cpu-compare: also ours bf16 + channels_last under torch.compile (inductor, freezing); "
        "its compile time is reported (minutes on 2 cores)",
    )
    p.add_argument("--cold-child", help=argparse.SUPPRESS)
    p.add_argument("--cold-compiled", action="store_true", help=argparse.SUPPRESS)
