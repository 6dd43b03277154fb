"""LowResImage: the bsr_sr concat (identity at latent size), contract, input checks."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import apply_model
from ldm_sdk.encoders.lowres import LowResImage


def test_identity_and_concat_order() -> None:
    enc = LowResImage()  # bsr_sr: VQ-f4, 3-channel latent + 3-channel image = in_channels 6
    lr = torch.rand(2, 3, 16, 16) * 2 - 1
    out = enc(lr)
    assert out is lr
    enc.contract().check(out, batch=2, image_hw=(64, 64))
    # what the UNet sees (CompVis DiffusionWrapper concat): cat([x, c_concat], dim=1), latent first
    x = torch.randn(2, 3, 16, 16)
    seen = apply_model(lambda xin, t: xin, x, torch.zeros(2), enc.conditioning(out), "concat")
    assert seen.shape == (2, 6, 16, 16)
    assert torch.equal(seen[:, :3], x) and torch.equal(seen[:, 3:], lr)


def test_contract_uses_first_stage_factor() -> None:
    c = LowResImage(latent_factor=8).contract()
    assert (c.kind, c.channels, c.latent_factor) == ("concat", 3, 8)
    with pytest.raises(ValueError, match=r"must be \[8, 8\] for a \[64, 64\] image"):
        c.check(torch.zeros(1, 3, 16, 16), batch=1, image_hw=(64, 64))
    enc = LowResImage()
    assert (enc.modality, enc.trainable, dict(enc.state_dict())) == ("lowres", False, {})


def test_input_errors() -> None:
    enc = LowResImage()
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]; its values span \[0, 255\].*x / 127.5 - 1"):
        enc(torch.tensor([0.0, 255.0]).repeat(12).reshape(1, 3, 2, 4))
    with pytest.raises(TypeError, match="float tensor"):
        enc(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        enc(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="never trained without it"):
        enc.unconditional(1)
