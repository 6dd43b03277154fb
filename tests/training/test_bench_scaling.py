"""training/bench_scaling.py end to end at tiny size on the CPU: 1 vs 2 gloo processes through torchrun and
the real trainer, DDP and FSDP. In fp32 the loss trajectories of 2 processes at half the batch equal one
process at the whole batch within 1e-5, the JSON and Markdown reports hold every field the GPU run needs,
and the deterministic FSDP resume is bit exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "bench_scaling.py"
STEPS = 6  # the tiny preset
Report = tuple[dict[str, Any], Path]  # results.json, the out folder


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("bench") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDM_SDK_NO_ENTRYPOINTS": "1"}
    env.pop("NCCL_NVLS_ENABLE", None)  # the script sets it for its children
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), "--budget-s", "1500"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "results.json").read_text()), out


def test_every_run_ran_and_the_environment_is_recorded(report: Report) -> None:
    results, out = report
    settings, env = results["settings"], results["environment"]
    assert settings["device"] == "cpu" and settings["nproc"] == 2 and settings["precision"] == "fp32"
    assert (
        settings["steps"] == STEPS and settings["unet_params"] > 0 and settings["latent_shape"] == [3, 8, 8]
    )
    assert env["torch"] == torch.__version__ and env["nccl_env"]["NCCL_NVLS_ENABLE"] == "0"
    assert env["omp_num_threads"] == "1" and env["cpu_count"] >= 1
    runs = results["runs"]
    names = {"single", "ddp2", "fsdp2", "single_global", "resume_whole", "resume_part", "resume_rest"}
    assert set(runs) == names and results["skipped"] == []
    for name, run in runs.items():
        assert run["returncode"] == 0 and run["error"] is None, name
    for name in ("single", "ddp2", "fsdp2", "single_global"):
        assert len(runs[name]["losses"]) == len(runs[name]["step_s"]) == STEPS
        assert runs[name]["timing"]["timed_steps"] == STEPS - settings["warmup"]
    assert (
        runs["ddp2"]["global_batch"] == runs["single_global"]["global_batch"] == 2 * runs["single"]["batch"]
    )
    assert runs["fsdp2"]["fsdp"] and not runs["ddp2"]["fsdp"] and runs["resume_whole"]["deterministic"]
    # the trainer's own per-step records, kept next to its log
    records = [json.loads(x) for x in (out / "runs" / "ddp2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["s_per_step"] > 0 and r["samples_per_s"] > 0 for r in records)
    assert (out / "runs" / "ddp2" / "train.log").is_file() and (
        out / "runs" / "ddp2" / "console.log"
    ).is_file()


def test_weak_scaling_fields(report: Report) -> None:
    weak = report[0]["weak_scaling"]
    rows = weak["rows"]
    assert rows["single"]["efficiency"] == pytest.approx(1.0)
    for name in ("ddp2", "fsdp2"):
        row = rows[name]
        assert row["nproc"] == 2 and row["samples_per_s"] > 0 and row["step_ms_mean"] > 0
        expected = row["samples_per_s"] / (2 * rows["single"]["samples_per_s"])
        assert row["efficiency"] == pytest.approx(expected)
    assert weak["ddp"] == rows["ddp2"]["efficiency"] and weak["fsdp"] == rows["fsdp2"]["efficiency"]


def test_two_processes_follow_one_process_loss_trajectory(report: Report) -> None:
    results = report[0]
    runs, same = results["runs"], results["same_global_batch"]
    reference = runs["single_global"]["losses"]
    assert max(reference) - min(reference) > 1e-3  # the model trains: the comparison is not vacuous
    assert set(same["comparisons"]) == {"ddp2 vs single_global", "fsdp2 vs single_global"}
    for name in ("ddp2", "fsdp2"):
        losses = runs[name]["losses"]  # checked here from the raw trajectories, not the script's numbers
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True)) < 1e-5, name
        comparison = same[name]
        assert comparison["steps"] == STEPS and comparison["max_rel_diff"] < 1e-5
        assert comparison["tolerance"] == 1e-5 and comparison["within"] is True
    # the one-process run at half the batch sees other data: its trajectory differs
    assert runs["single"]["losses"] != reference


def test_fsdp_resume_is_bit_exact(report: Report) -> None:
    resume = report[0]["resume"]
    assert resume["steps"] == 4 and resume["split"] == 2 and resume["global_step"] == [4, 4]
    assert resume["tensors_compared"] > 100 and resume["tensors_differing"] == 0
    assert resume["max_weight_abs_diff"] == 0.0 and resume["max_optimizer_abs_diff"] == 0.0
    assert resume["loss_max_abs_diff_after_resume"] == 0.0 and resume["bit_exact"] is True


def test_markdown_report(report: Report) -> None:
    text = (report[1] / "results.md").read_text()
    assert "## Weak scaling" in text and "| ddp2 | 2 |" in text and "| fsdp2 | 2 |" in text
    assert "ddp2 vs single_global" in text and "bit exact: True" in text
