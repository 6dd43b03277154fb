"""train_autoencoder and its loss: overfitting a tiny batch (KL and VQ), first-stage checkpoints that
ldm_sdk.load reads back exactly, the adaptive GAN weight against an independent autograd computation, the
discriminator losses, and what happens to LPIPS without pretrained weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm_sdk
from ldm_sdk.models.first_stage import AutoencoderKL
from ldm_sdk.training.discriminator import NLayerDiscriminator
from ldm_sdk.training.losses import AutoencoderLoss, adaptive_weight, hinge_d_loss, vanilla_d_loss
from ldm_sdk.training.lpips import LPIPS, SLICES, build_perceptual_loss
from ldm_sdk.training.train_autoencoder import main
from tests.training.conftest import TinyImages, autoencoder_args


def _args(out: Path, *extra: str, model: str = "tiny:kl-f4") -> list[str]:
    return autoencoder_args("--perceptual-weight", "0", "--out-dir", str(out), *extra, model=model)


def _l1(ae: nn.Module, data: TinyImages) -> float:
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mode()) if isinstance(ae, AutoencoderKL) else ae(x)[0]
    return float((rec - x).abs().mean())


@pytest.mark.parametrize("model", ["tiny:kl-f4", "tiny:vq-f4"])
def test_overfits_and_first_stage_checkpoint_loads_with_same_outputs(tmp_path: Path, model: str) -> None:
    data = TinyImages(4)
    start = main([*_args(tmp_path / "start", model=model), "--max-steps", "0"], dataset=data)
    steps = "30" if model == "tiny:kl-f4" else "40"
    result = main(
        [
            *_args(tmp_path / "run", model=model),
            "--max-steps",
            steps,
            "--disc-start",
            "20",
            "--sample-every",
            "20",
        ],
        dataset=data,
    )
    assert start.bundle is not None and result.bundle is not None
    before, after = _l1(start.bundle.first_stage_model, data), _l1(result.bundle.first_stage_model, data)
    assert after < 0.6 * before, (before, after)
    logs = result.history[-1]
    assert logs["disc_factor"] == 1.0 and logs["d_weight"] > 0 and result.history[0]["d_weight"] == 0
    assert ("kl_loss" if model == "tiny:kl-f4" else "quant_loss") in logs
    assert (tmp_path / "run" / "samples" / "recon-00000020.png").is_file()

    ae = result.bundle.first_stage_model
    x = torch.stack([data[i]["image"] for i in range(2)])
    with torch.no_grad():
        z = ae.encode(x).mode() if isinstance(ae, AutoencoderKL) else ae.encode(x)
        want = ae.decode(z)
    for path in (result.checkpoint, result.export):
        loaded = ldm_sdk.load(path)  # strict: every key of the first stage, the loss.* entries skipped
        assert loaded.model is None
        with torch.no_grad():
            got_z = loaded.encode_first_stage(x)
            assert torch.equal(got_z, z)
            assert torch.equal(loaded.decode_first_stage(got_z), want)
    skipped = ldm_sdk.load(result.checkpoint).skipped_entries
    assert any(k.startswith("loss.discriminator.main.") for k in skipped)


def test_adaptive_weight_matches_an_independent_autograd_computation() -> None:
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    h = torch.randn(2, 4, 16, 16)
    x = torch.randn(2, 3, 16, 16)

    def losses() -> tuple[torch.Tensor, torch.Tensor]:
        rec = last(h)
        return (rec - x).abs().sum() / 2, -disc(rec).mean()

    nll, g = losses()
    got = adaptive_weight(nll, g, last.weight, disc_weight=0.5)
    # independently: two fresh graphs, each differentiated with .backward() into .grad
    grads = []
    for pick in (0, 1):
        last.zero_grad()
        losses()[pick].backward()
        grads.append(last.weight.grad.detach().clone())  # type: ignore[union-attr]
    want = 0.5 * torch.clamp(grads[0].norm() / (grads[1].norm() + 1e-4), 0.0, 1e4)
    assert torch.allclose(got, want, rtol=1e-6)
    assert not got.requires_grad


def test_generator_loss_composition_and_disc_start() -> None:
    torch.manual_seed(0)
    ae = AutoencoderKL(
        {"z_channels": 3, "resolution": 16, "ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1}, 3
    )
    loss = AutoencoderLoss("kl", disc_start=5, kl_weight=0.1, disc_ndf=8, disc_num_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    rec = ae.decode(posterior.mode())
    last = ae.decoder.conv_out.weight
    early, logs = loss.generator_loss(x, rec, 4, last, posterior=posterior)
    nll = (rec - x).abs().sum() / 2  # logvar 0: rec / exp(0) + 0
    kl = posterior.kl().sum() / 2
    assert torch.allclose(early, nll + 0.1 * kl)
    assert float(logs["disc_factor"]) == 0 and float(logs["d_weight"]) == 0
    late, logs = loss.generator_loss(x, rec, 5, last, posterior=posterior)
    g = -loss.discriminator(rec).mean()
    w = adaptive_weight(nll, g, last, 0.5)
    assert torch.allclose(late, nll + 0.1 * kl + w * g, rtol=1e-5)
    d_loss, _ = loss.discriminator_loss(x, rec, 4)
    assert float(d_loss.detach()) == 0.0


def test_discriminator_losses_closed_form() -> None:
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 4) / 3)))
    want = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert torch.isclose(vanilla_d_loss(real, fake), want)


def test_patchgan_names_and_shape() -> None:
    disc = NLayerDiscriminator()  # taming defaults: 3 layers, ndf 64, BatchNorm
    keys = set(disc.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"} <= keys
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_lpips_is_disabled_without_weights_unless_a_random_trunk_is_asked_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm_sdk.training"):
        assert build_perceptual_loss(None) is None
    assert "perceptual loss DISABLED" in caplog.text
    lpips = build_perceptual_loss(None, allow_random_trunk=True)
    assert isinstance(lpips, LPIPS)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(lpips(x, x)) == 0.0 and float(lpips(x, -x)) > 0


def test_lpips_reads_a_torchvision_vgg16_and_heads(tmp_path: Path) -> None:
    """A torchvision-layout VGG16 file (random weights: none ship offline) loads into the trunk, whose slices
    then reproduce torchvision's own features; the heads file sets the per-layer weights."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, tmp_path / "heads.pth")
    lpips = build_perceptual_loss(tmp_path / "vgg16.pth", tmp_path / "heads.pth")
    assert lpips is not None
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = lpips.net(x)
        ref = x
        for (start, end), feature in zip(SLICES, ours, strict=True):
            for j in range(start, end):
                ref = vgg.features[j](ref)
            assert torch.allclose(feature, ref, atol=1e-6)
    assert torch.equal(lpips.lin3.model[1].weight, heads["lin3.model.1.weight"])
    with pytest.raises(ValueError, match="not a VGG16 trunk"):
        build_perceptual_loss(tmp_path / "heads.pth")
