"""train_ldm: overfitting a tiny batch, checkpoints that ldm_sdk.load reads back exactly, conditioning
(trained class embedder with dropout, a frozen concat encoder), bf16, accumulation, gradient checkpointing,
precomputed latents, sample grids and the ``ldm-sdk train`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import ldm_sdk
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.objective import diffusion_loss
from ldm_sdk.testing.tiny import LDM_KL_F4_UNCOND
from ldm_sdk.training.train_ldm import main
from tests.training.conftest import TinyImages


def _args(out: Path, first_stage: Path, *extra: str, model: str = "tiny:ldm_kl_f4_uncond") -> list[str]:
    return [
        "--model",
        model,
        "--first-stage",
        str(first_stage),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--no-scale-lr",
        "--log-every",
        "100",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        *extra,
    ]


def _fixed_loss(bundle: ModelBundle, data: TinyImages, cond: Conditioning | None = None) -> float:
    """The diffusion loss of the whole tiny set at fixed timesteps and noise (posterior-mode latents)."""
    assert bundle.schedule is not None and bundle.config.diffusion is not None
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    z = bundle.encode_first_stage(x)
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, bundle.schedule.num_timesteps, (len(data),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    with torch.no_grad():
        loss, _ = diffusion_loss(
            bundle.apply_model, bundle.schedule, z, cond or Conditioning(), t, noise, bundle.config.diffusion
        )
    return float(loss)


def test_overfits_and_checkpoint_loads_strictly_with_same_outputs(
    tmp_path: Path, kl_first_stage: Path
) -> None:
    data = TinyImages(4)
    start = main([*_args(tmp_path / "start", kl_first_stage), "--max-steps", "0"], dataset=data)
    trained = main([*_args(tmp_path / "run", kl_first_stage), "--max-steps", "25"], dataset=data)
    assert start.bundle is not None and trained.bundle is not None
    before, after = _fixed_loss(start.bundle, data), _fixed_loss(trained.bundle, data)
    assert after < 0.6 * before, (before, after)

    # the training checkpoint and the exported .safetensors load strictly and compute the same outputs
    assert trained.checkpoint is not None and trained.export is not None and trained.ema is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    image = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = trained.bundle.apply_model(x, t, Conditioning())
        want_decode = trained.bundle.decode_first_stage(x)
        want_encode = trained.bundle.encode_first_stage(image)
    for path in (trained.checkpoint, trained.export):
        loaded = ldm_sdk.load(path)
        with torch.no_grad():
            assert torch.equal(loaded.apply_model(x, t, Conditioning()), want)
            assert torch.equal(loaded.decode_first_stage(x), want_decode)
            assert torch.equal(loaded.encode_first_stage(image), want_encode)
        ema = trained.ema.bundle_weights()
        assert loaded.ema_weights.keys() == ema.keys()
        assert all(torch.equal(loaded.ema_weights[k], v) for k, v in ema.items())
    ema_model = ldm_sdk.load(trained.checkpoint, use_ema=True)
    shadows = trained.ema.state_dict()
    for name, p in ema_model.model.named_parameters():  # type: ignore[union-attr]
        assert torch.equal(p, shadows[name.replace(".", "")])
    assert int(ema["model_ema.num_updates"]) == 25


def test_trained_class_embedder_with_condition_dropout(tmp_path: Path, vq_first_stage: Path) -> None:
    from ldm_sdk.encoders.from_bundle import build_cond_stage
    from ldm_sdk.runtime import Runtime

    data = TinyImages(8)
    params = json.dumps({"n_classes": 11, "uncond_class": 10})
    args = _args(tmp_path, vq_first_stage, model="tiny:ldm_vq_f4_class")
    result = main(
        [
            *args,
            "--cond-params",
            params,
            "--cond-drop",
            "0.5",
            "--max-steps",
            "4",
            "--sample-every",
            "4",
            "--sample-steps",
            "2",
            "--sample-count",
            "3",
            "--sample-cfg",
            "2.0",
        ],
        dataset=data,
    )
    encoder, bundle = result.encoder, result.bundle
    assert encoder is not None and bundle is not None and result.checkpoint is not None
    # jointly trained: the label table moved, the null label's row too (it was used by the dropped samples)
    torch.manual_seed(0)
    fresh = type(encoder)(embed_dim=32, n_classes=11, uncond_class=10)
    weight = encoder.state_dict()["embedding.weight"]
    assert not torch.equal(weight[10], fresh.embedding.weight[10])
    assert encoder.embedding.weight.requires_grad
    # the checkpoint rebuilds the same encoder through the registry
    loaded = ldm_sdk.load(result.checkpoint)
    assert loaded.config.cond_stage is not None
    assert loaded.config.cond_stage.params["uncond_class"] == 10
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        rebuilt = build_cond_stage(loaded, runtime.registries.condition_encoders)
    assert rebuilt is not None
    assert torch.equal(rebuilt.state_dict()["embedding.weight"], weight)
    grid = tmp_path / "samples" / "step-00000004.png"
    assert grid.is_file() and grid.stat().st_size > 100


def test_frozen_concat_encoder_and_what_cannot_be_dropped(tmp_path: Path, kl_first_stage: Path) -> None:
    unet = LDM_KL_F4_UNCOND.unet.model_copy(update={"in_channels": 6})  # type: ignore[union-attr]
    diffusion = LDM_KL_F4_UNCOND.diffusion.model_copy(update={"conditioning_key": "concat"})  # type: ignore[union-attr]
    config = LDM_KL_F4_UNCOND.model_copy(update={"family": "tiny-sr", "unet": unet, "diffusion": diffusion})
    model = tmp_path / "sr.json"
    model.write_text(config.model_dump_json())
    args = _args(
        tmp_path / "run", kl_first_stage, "--cond-encoder", "lowres", "--max-steps", "2", model=str(model)
    )
    result = main(args, dataset=TinyImages(4))
    assert result.encoder is not None and not any(True for _ in result.encoder.parameters())
    assert ldm_sdk.load(result.checkpoint).config.cond_stage.target == "torch.nn.Identity"  # type: ignore[arg-type,union-attr]
    with pytest.raises(ValueError, match="cannot be dropped"):
        main([*args, "--cond-drop", "0.1"], dataset=TinyImages(4))
    unconditional = _args(tmp_path / "bad", kl_first_stage, "--cond-encoder", "lowres", "--max-steps", "2")
    with pytest.raises(ValueError, match="needs conditioning_key 'concat'; the model has None"):
        main(unconditional, dataset=TinyImages(4))


def _unet_state(result: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.bundle.unet.state_dict().items()}


def test_gradient_checkpointing_changes_nothing_and_bf16_accumulation_run(
    tmp_path: Path, kl_first_stage: Path
) -> None:
    data = TinyImages(8)
    plain = main([*_args(tmp_path / "a", kl_first_stage), "--max-steps", "2"], dataset=data)
    ckpt = main(
        [*_args(tmp_path / "b", kl_first_stage), "--max-steps", "2", "--gradient-checkpointing"], dataset=data
    )
    a, b = _unet_state(plain), _unet_state(ckpt)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert ckpt.bundle is not None and ckpt.bundle.config.unet.use_checkpoint  # type: ignore[union-attr]
    mixed = main(
        [
            *_args(tmp_path / "c", kl_first_stage),
            "--max-steps",
            "2",
            "--precision",
            "bf16",
            "--grad-accum",
            "2",
            "--batch-size",
            "2",
            "--scale-by-std",
        ],
        dataset=data,
    )
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in mixed.history)
    assert mixed.bundle is not None and mixed.bundle.scale_factor != 1.0
    assert ldm_sdk.load(mixed.checkpoint).scale_factor == mixed.bundle.scale_factor  # type: ignore[arg-type]


def test_precomputed_latents_train_like_encoding_on_the_fly(tmp_path: Path, kl_first_stage: Path) -> None:
    from ldm_sdk.training.data.latents import encode_to_latents

    data = TinyImages(8)
    first = ldm_sdk.load(kl_first_stage)
    shard = encode_to_latents(first, data, tmp_path / "latents.safetensors", keys=("class_label",))
    common = ["--max-steps", "3", "--no-latent-sample"]
    images = main([*_args(tmp_path / "img", kl_first_stage), *common], dataset=data)
    stored = main([*_args(tmp_path / "lat", kl_first_stage), *common, "--data", f"latents:{shard}"])
    a, b = _unet_state(images), _unet_state(stored)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_cli_train_command(tmp_path: Path, kl_first_stage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldm_sdk.cli import main as cli

    out = tmp_path / "cli"
    base = _args(out, kl_first_stage)
    assert cli(["train", "ldm", *base, "--data", "synthetic:4", "--max-steps", "1"]) == 0
    assert (out / "last.ckpt").is_file() and (out / "model.safetensors").is_file()
    assert cli(["train", "ldm", *base, "--data", "nope:1", "--max-steps", "1"]) == 1
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_a_first_stage_of_other_latent_channels_is_refused(tmp_path: Path, kl_first_stage: Path) -> None:
    with pytest.raises(ValueError, match="the first stage has 3 latent channels but the UNet takes 4"):
        main(_args(tmp_path, kl_first_stage, "--max-steps", "1", model="tiny:sd1"), dataset=TinyImages(4))
