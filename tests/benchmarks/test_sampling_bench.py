"""``ldm-sdk bench`` / :mod:`ldm_sdk.benchmarks.sampling`: options, the command line handed to fresh
processes, and one small CPU run whose two engines must agree (diffusers is the independent reference)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ldm_sdk.benchmarks import common as C
from ldm_sdk.benchmarks import sampling
from ldm_sdk.benchmarks.options import ARCH_NAMES, SIZE_NAMES, add_arguments
from ldm_sdk.cli import main as cli_main


def parsed(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_option_choices_are_the_benchmark_tables() -> None:
    assert sorted(ARCH_NAMES) == sorted(C.ARCHS)
    assert sorted(SIZE_NAMES) == sorted(C.SIZES)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--fast", "--device", "cuda", "--batch-sizes", "1,8", "--iters", "5"],
        ["--cpu-compare", "--size", "ci", "--with-compiled", "--threads", "2"],
        ["--arch", "cin256", "--compile", "--compile-mode", "max-autotune", "--guidance", "3.0"],
    ],
)
def test_to_argv_gives_back_the_same_options(argv: list[str]) -> None:
    ns = parsed(argv)
    assert vars(parsed(sampling.to_argv(ns))) == vars(ns)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fast", "--compile"], "two different fast paths"),
        (["--cpu-compare", "--dtype", "bf16"], "sets the engines itself"),
        (["--with-compiled"], "belongs to --cpu-compare"),
    ],
)
def test_conflicting_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sampling.resolve(parsed(argv))


def test_cpu_compare_defaults_to_the_cpu() -> None:
    assert sampling.resolve(parsed(["--cpu-compare"])).device == "cpu"


def test_ldm_sdk_bench_on_the_cpu_agrees_with_diffusers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--size", "ci", "--steps", "2", "--batch-sizes", "1"]
    argv += ["--iters", "1", "--e2e-repeats", "1", "--no-cold", "--out", str(out)]
    assert cli_main(argv) == 0
    results = json.loads(out.read_text())
    engines = results["sections"]["eager"]["engines"]
    assert set(engines) == {"ours", "diffusers"}
    for r in engines.values():
        assert r["unet_ms"] > 0 and r["image_finite"]
    # the same random weights in both engines: fp32 outputs agree to rounding
    assert results["unet_parity_rel_err"] <= 1e-5
    assert results["sections"]["eager"]["image_parity_rel_err_b1"] <= 1e-4
    gflops = results["unet_gflops_per_step"]
    assert gflops["ours"] == pytest.approx(gflops["diffusers"])


def test_randomize_fills_parameters_that_require_grad() -> None:
    """The benchmarks' random weights go into ordinary (trainable) modules, as built."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 4))
    C.randomize_(model, torch.Generator().manual_seed(0))
    weight = model[0].weight
    assert weight.requires_grad and abs(float(weight.std()) - (1 / 27) ** 0.5) < 0.1
    assert abs(float(model[1].weight.mean()) - 1.0) < 0.3
