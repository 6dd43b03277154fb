"""The palette encoder: the SDK's condition-encoder contract, and palettes of images with known colors."""

from __future__ import annotations

import pytest
import torch
from ldm_sdk_plugin_example.palette import PaletteEncoder
from torch import Tensor

from ldm_sdk.testing.contracts import ConditionEncoderContract


def references(batch_size: int) -> Tensor:
    """Distinct images: noise, plus a differently placed flat patch per item."""
    images = torch.rand(batch_size, 3, 16, 16, generator=torch.Generator().manual_seed(batch_size)) * 2 - 1
    for i in range(batch_size):
        images[i, :, : 4 + 2 * i, :] = torch.tensor([0.9, -0.8, 0.1 * i])[:, None, None]
    return images


class TestPaletteContract(ConditionEncoderContract):
    """Everything the SDK expects of a condition encoder (ldm_sdk.testing.contracts)."""

    def make_encoder(self) -> PaletteEncoder:
        return PaletteEncoder(context_dim=16, n_colors=4, levels=4, hidden=8)

    def make_inputs(self, batch_size: int) -> Tensor:
        return references(batch_size)


def flag() -> Tensor:
    """Three stripes: 50% red, 30% blue, 20% white; as [1, 3, 10, 10] in [-1, 1]."""
    image = torch.empty(1, 3, 10, 10)
    image[0, :, :5] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    image[0, :, 5:8] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    image[0, :, 8:] = 1.0
    return image


def test_palette_of_a_flag_is_its_stripes_by_area() -> None:
    colors, shares = PaletteEncoder(context_dim=8, n_colors=4).palette(flag())
    torch.testing.assert_close(shares, torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    torch.testing.assert_close(
        colors[0, :3], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    )
    assert torch.equal(colors[0, 3], torch.zeros(3))  # only three colors: the fourth slot is empty


def test_the_palette_is_the_mean_color_of_each_bin() -> None:
    image = torch.full((1, 3, 4, 4), -1.0)
    image[0, 0, :, :2] = torch.tensor([0.6, 0.7])  # two reds of one bin (levels=2: >= 0 is the upper half)
    colors, shares = PaletteEncoder(context_dim=8, n_colors=2, levels=2).palette(image)
    torch.testing.assert_close(shares, torch.tensor([[0.5, 0.5]]))
    # 8 pixels each: the tie goes to the lower bin, black (bin 0) before red (bin 4)
    torch.testing.assert_close(colors[0], torch.tensor([[0.0, 0.0, 0.0], [0.825, 0.0, 0.0]]))


def test_empty_slots_use_the_no_color_token() -> None:
    enc = PaletteEncoder(context_dim=8, n_colors=4)
    tokens = enc(flag())
    torch.testing.assert_close(tokens[0, 3], (enc.empty + enc.rank[3]).detach())
    assert not torch.allclose(tokens[0, 0], (enc.empty + enc.rank[0]).detach())


def test_tokens_train() -> None:
    enc = PaletteEncoder(context_dim=8, n_colors=3)
    enc(flag()).square().sum().backward()
    assert all(p.grad is not None for p in enc.mlp.parameters())


def test_bad_images_say_what_is_valid() -> None:
    enc = PaletteEncoder(context_dim=8)
    with pytest.raises(TypeError, match=r"x / 127\.5 - 1"):
        enc(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        enc(torch.full((1, 3, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="exceeds the 8 histogram bins"):
        PaletteEncoder(n_colors=9, levels=2)
