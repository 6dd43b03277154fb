"""The ``ldm-sdk`` command line: ``inspect``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_sdk.checkpoints.loader import save
from ldm_sdk.cli import COMMANDS, main
from tests.checkpoints.fakes import Payload, save_torch
from tests.tiny_configs import KL_F8_FIRST_STAGE, SD1, random_bundle


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    bundle = random_bundle(SD1, seed=5, ema=True)
    path = save(bundle, tmp_path_factory.mktemp("cli") / "tiny.ckpt", metadata={"global_step": 321})
    return path, bundle


def test_inspect_json(sd1_file, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    path, bundle = sd1_file
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    unet, first = _numel(bundle.unet), _numel(bundle.first_stage_model)
    cond = sum(t.numel() for t in bundle.cond_stage_weights.values())
    assert info["parameters"] == {
        "unet": unet,
        "first_stage": first,
        "cond_stage": cond,
        "ema": unet,
        "total": unet + first + cond,
    }
    assert info["family"] == "tiny-sd1" and info["config_source"] == "embedded"
    assert info["format"] == "torch-zip" and info["global_step"] == 321
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["latent_channels"] == 4 and info["downsampling_factor"] == 8
    assert info["conditioning_key"] == "crossattn" and info["parameterization"] == "eps"
    assert info["has_ema"] is True and info["context_dim"] == 32


def test_inspect_first_stage_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = random_bundle(KL_F8_FIRST_STAGE)
    path = save(bundle, tmp_path / "vae.safetensors")
    assert main(["inspect", str(path), "--json", "--no-hash"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["first_stage"] == _numel(bundle) and info["parameters"]["unet"] == 0
    assert info["sha256"] is None and info["has_ema"] is False and info["parameterization"] is None


def test_inspect_human_output(sd1_file, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    path, bundle = sd1_file
    assert main(["inspect", str(path), "--no-hash"]) == 0
    out = capsys.readouterr().out
    assert "tiny-sd1" in out and "EMA weights" in out and f"{_numel(bundle.unet):,}" in out


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    evil = save_torch(
        {"state_dict": {"a": torch.zeros(1)}, "x": Payload(os.system, ("true",))}, tmp_path / "e.ckpt"
    )
    unknown = tmp_path / "unknown.ckpt"
    torch.save({"state_dict": {"some.other.net.weight": torch.zeros(2)}}, unknown)
    return {
        "missing": (tmp_path / "nope.ckpt", "no such checkpoint file"),
        "not-a-checkpoint": (text, "is not a checkpoint"),
        "unsafe": (evil, "refused to load"),
        "unknown-family": (unknown, "no CompVis model keys found"),
    }


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint", "unsafe", "unknown-family"])
def test_bad_input_exits_nonzero_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, message = _bad_inputs(tmp_path)[case]
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm-sdk inspect: error: ") and message in lines[0]


def test_invalid_yaml_config_is_a_user_error(sd1_file, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["inspect", str(sd1_file[0]), "--config", str(bad)]) == 1
    assert capsys.readouterr().err.startswith("ldm-sdk inspect: error: ")


def test_module_entry_point(tmp_path: Path) -> None:
    path, message = _bad_inputs(tmp_path)["not-a-checkpoint"]
    run = subprocess.run(
        [sys.executable, "-m", "ldm_sdk", "inspect", str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr


def test_commands_are_registered_modules() -> None:
    assert "inspect" in COMMANDS
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
