"""Two CPU processes (torchrun, gloo) train exactly like one process on the same global batch: the
sampler splits the global batch, every random draw is made for the global batch and sliced per rank, and
DDP averages the gradients. Weights agree up to floating-point reduction order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_sdk.training import train_autoencoder, train_ldm
from ldm_sdk.training.checkpointing import load_training_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


def _torchrun(module: str, args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDM_SDK_NO_ENTRYPOINTS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        module,
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "", atol: float = 1e-8
) -> int:
    """Every floating tensor under ``prefix`` equal up to fp32 reduction-order noise (1e-6 relative, ``atol``
    for elements near 0).

    The runs raise Adam's ``eps`` (1e-3; 1 for the autoencoder, whose summed pixel loss has large gradients):
    with the default 1e-8, a gradient element about as small as eps turns reduction noise into an update
    difference of up to 1e-2 lr, which would hide nothing but needs a loose tolerance."""
    count = 0
    for k, v in a.items():
        if k.startswith(prefix) and v.is_floating_point():
            assert torch.allclose(v, b[k], rtol=1e-6, atol=atol), (k, float((v - b[k]).abs().max()))
            count += 1
    assert count > 0
    return count


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path: Path, vq_first_stage: Path) -> None:
    common = [
        "--model",
        "tiny:ldm_vq_f4_class",
        "--first-stage",
        str(vq_first_stage),
        "--data",
        "synthetic:16",
        "--cond-params",
        json.dumps({"n_classes": 11, "uncond_class": 10}),
        "--cond-drop",
        "0.3",
        "--image-size",
        "32",
        "--lr",
        "1e-3",
        "--adam-eps",
        "1e-3",
        "--no-scale-lr",
        "--max-steps",
        "3",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--device",
        "cpu",
    ]
    _torchrun("ldm_sdk.training.train_ldm", [*common, "--batch-size", "2", "--out-dir", "ddp"], tmp_path)
    single = train_ldm.main([*common, "--batch-size", "4", "--out-dir", str(tmp_path / "one")])
    assert single.checkpoint is not None
    two = load_training_checkpoint(tmp_path / "ddp" / "last.ckpt")
    one = load_training_checkpoint(single.checkpoint)
    assert two.global_step == one.global_step == 3 and len(two.rng) == 2
    moved = float((one.state_dict["model.diffusion_model.out.2.weight"]).abs().max())
    assert moved > 1e-4  # the zero-initialised output layer trained: the comparison is not vacuous
    _close(one.state_dict, two.state_dict)  # UNet, class embedder, EMA


def test_two_process_autoencoder_equals_one_before_the_gan_starts(tmp_path: Path) -> None:
    common = [
        "--model",
        "tiny:kl-f4",
        "--data",
        "synthetic:16",
        "--image-size",
        "32",
        "--lr",
        "1e-3",
        "--adam-eps",
        "1.0",
        "--no-scale-lr",
        "--perceptual-weight",
        "0",
        "--disc-ndf",
        "8",
        "--disc-layers",
        "2",
        "--disc-start",
        "100",
        "--max-steps",
        "2",
        "--sample-every",
        "0",
        "--device",
        "cpu",
    ]
    _torchrun(
        "ldm_sdk.training.train_autoencoder", [*common, "--batch-size", "2", "--out-dir", "ddp"], tmp_path
    )
    single = train_autoencoder.main([*common, "--batch-size", "4", "--out-dir", str(tmp_path / "one")])
    two = load_training_checkpoint(tmp_path / "ddp" / "last.ckpt")
    one = load_training_checkpoint(single.checkpoint)  # type: ignore[arg-type]
    _close(one.state_dict, two.state_dict, prefix="encoder.", atol=1e-7)
    _close(one.state_dict, two.state_dict, prefix="decoder.", atol=1e-7)
    _close(one.state_dict, two.state_dict, prefix="quant_conv.", atol=1e-7)
