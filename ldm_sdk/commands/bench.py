"""``ldm-sdk bench``: the sampling benchmark against diffusers (:mod:`ldm_sdk.benchmarks.sampling`)."""

from __future__ import annotations

import argparse

from ldm_sdk.benchmarks.options import add_arguments as _bench_arguments

HELP = "time sampling against diffusers on identical random weights (GPU fast path, CPU mode)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _bench_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("diffusers") is None and not args.no_diffusers:
        raise ValueError(
            "the benchmark compares against diffusers, which is not installed: "
            "pip install 'ldm-sdk[bench]' (or pass --no-diffusers to time ldm_sdk alone)"
        )
    from ldm_sdk.benchmarks import sampling

    argv = sampling.to_argv(args)  # before resolve(): what the fresh first-image processes receive
    sampling.run(sampling.resolve(args), argv)
    return 0
