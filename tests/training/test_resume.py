"""Resume continues EXACTLY: N steps in one go equal k steps, a stop, and a resume to N - model, EMA,
optimizer state, encoder, discriminator, step, data position and RNG streams, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ldm_sdk.training import train_autoencoder, train_ldm
from ldm_sdk.training.checkpointing import load_training_checkpoint
from tests.training.conftest import TinyImages, autoencoder_args


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive torch.equal over (nested) state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _compare_runs(whole: Path, resumed: Path) -> None:
    a, b = load_training_checkpoint(whole / "last.ckpt"), load_training_checkpoint(resumed / "last.ckpt")
    assert a.global_step == b.global_step and a.epoch == b.epoch and a.data == b.data
    _assert_same(a.state_dict, b.state_dict, "state_dict")
    _assert_same(a.optimizers, b.optimizers, "optimizers")
    _assert_same(a.schedulers, b.schedulers, "schedulers")
    _assert_same(a.rng, b.rng, "rng")


@pytest.mark.parametrize("case", ["class_vq", "uncond_kl"])
def test_ldm_resume_is_exact(tmp_path: Path, case: str, kl_first_stage: Path, vq_first_stage: Path) -> None:
    if case == "class_vq":  # trained encoder, condition dropout
        extra = [
            "--model",
            "tiny:ldm_vq_f4_class",
            "--first-stage",
            str(vq_first_stage),
            "--cond-drop",
            "0.3",
            "--cond-params",
            json.dumps({"n_classes": 11, "uncond_class": 10}),
        ]
    else:  # KL posterior sampling, scale_by_std, learned logvar, warm-up
        extra = [
            "--model",
            "tiny:ldm_kl_f4_uncond",
            "--first-stage",
            str(kl_first_stage),
            "--scale-by-std",
            "--warmup-steps",
            "3",
            "--grad-clip",
            "1.0",
        ]
    data = TinyImages(8)  # 2 batches of 4 per epoch: 5 steps cross two epoch ends, the stop is mid-epoch
    common = [
        *extra,
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--no-scale-lr",
        "--ema-decay",
        "0.9",
        "--log-every",
        "100",
        "--sample-every",
        "0",
        "--device",
        "cpu",
    ]
    whole = train_ldm.main([*common, "--out-dir", str(tmp_path / "whole"), "--max-steps", "5"], dataset=data)
    part = tmp_path / "part"
    train_ldm.main([*common, "--out-dir", str(part), "--max-steps", "3"], dataset=data)
    resumed = train_ldm.main(
        [*common, "--out-dir", str(part), "--max-steps", "5", "--resume", "auto"], dataset=data
    )
    assert whole.bundle is not None and resumed.bundle is not None and resumed.step == 5
    for k, v in whole.bundle.unet.state_dict().items():
        assert torch.equal(v, resumed.bundle.unet.state_dict()[k]), k
    assert whole.ema is not None and resumed.ema is not None
    _assert_same(whole.ema.state_dict(), resumed.ema.state_dict(), "ema")
    assert [h["loss"] for h in whole.history[3:]] == [h["loss"] for h in resumed.history]
    _compare_runs(tmp_path / "whole", part)


def test_ldm_resume_refuses_another_model(tmp_path: Path, kl_first_stage: Path) -> None:
    common = [
        "--first-stage",
        str(kl_first_stage),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--sample-every",
        "0",
        "--out-dir",
        str(tmp_path),
    ]
    train_ldm.main([*common, "--model", "tiny:ldm_kl_f4_uncond", "--max-steps", "1"], dataset=TinyImages(4))
    with pytest.raises(ValueError, match="another model config"):
        train_ldm.main(
            [
                *common,
                "--model",
                "tiny:ldm_kl_f4_uncond",
                "--max-steps",
                "2",
                "--resume",
                "auto",
                "--gradient-checkpointing",
            ],
            dataset=TinyImages(4),
        )


def test_autoencoder_resume_is_exact(tmp_path: Path) -> None:
    data = TinyImages(8)
    common = autoencoder_args("--perceptual-weight", "1", "--random-lpips", "--disc-start", "2")
    whole = train_autoencoder.main(
        [*common, "--out-dir", str(tmp_path / "whole"), "--max-steps", "5"], dataset=data
    )
    part = tmp_path / "part"
    train_autoencoder.main([*common, "--out-dir", str(part), "--max-steps", "3"], dataset=data)
    resumed = train_autoencoder.main(
        [*common, "--out-dir", str(part), "--max-steps", "5", "--resume", str(part / "last.ckpt")],
        dataset=data,
    )
    assert whole.bundle is not None and resumed.bundle is not None
    for k, v in whole.bundle.first_stage_model.state_dict().items():
        assert torch.equal(v, resumed.bundle.first_stage_model.state_dict()[k]), k
    assert whole.history[3:] == resumed.history
    _compare_runs(tmp_path / "whole", part)  # discriminator (loss.*), both Adam states, RNG
    keys = load_training_checkpoint(part / "last.ckpt").state_dict
    assert "loss.discriminator.main.3.running_mean" in keys and not any("perceptual" in k for k in keys)
