"""FSDP2 (``--fsdp``) on two CPU processes (gloo): the sharded UNet trains like one process on the same global
batch, its checkpoint is gathered into the CompVis layout, and a resumed sharded run continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm_sdk.training import train_ldm
from ldm_sdk.training.checkpointing import load_training_checkpoint
from tests.training.test_ddp import _close, _torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


def test_fsdp_equals_one_process_and_resumes_exactly(tmp_path: Path, vq_first_stage: Path) -> None:
    common = [
        "--model", "tiny:ldm_vq_f4_class", "--first-stage", str(vq_first_stage), "--data", "synthetic:16",
        "--cond-params", json.dumps({"n_classes": 11, "uncond_class": 10}), "--cond-drop", "0.3",
        "--image-size", "32", "--lr", "1e-3", "--adam-eps", "1e-3", "--no-scale-lr", "--log-every", "1",
        "--sample-steps", "2", "--device", "cpu",
    ]  # fmt: skip
    sharded = [*common, "--fsdp", "--batch-size", "2", "--sample-every", "2"]
    _torchrun("ldm_sdk.training.train_ldm", [*sharded, "--max-steps", "3", "--out-dir", "whole"], tmp_path)
    _torchrun("ldm_sdk.training.train_ldm", [*sharded, "--max-steps", "2", "--out-dir", "part"], tmp_path)
    _torchrun(
        "ldm_sdk.training.train_ldm",
        [*sharded, "--max-steps", "3", "--out-dir", "part", "--resume", "auto"],
        tmp_path,
    )
    single = train_ldm.main([*common, "--batch-size", "4", "--max-steps", "3", "--sample-every", "0",
                             "--out-dir", str(tmp_path / "one")])  # fmt: skip
    whole = load_training_checkpoint(tmp_path / "whole" / "last.ckpt")
    resumed = load_training_checkpoint(tmp_path / "part" / "last.ckpt")
    one = load_training_checkpoint(single.checkpoint)  # type: ignore[arg-type]
    assert whole.state_dict.keys() == one.state_dict.keys()  # gathered: full tensors, CompVis names
    _close(one.state_dict, whole.state_dict)
    for key, value in whole.state_dict.items():
        assert torch.equal(value, resumed.state_dict[key]), key
    assert (tmp_path / "whole" / "samples" / "step-00000002.png").is_file()
