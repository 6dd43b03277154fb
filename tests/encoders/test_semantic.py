"""SpatialRescaler: CompVis keys, one-hot conversion, bilinear halving = 2x2 mean, 1x1 channel mapping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_sdk.encoders.semantic import SpatialRescaler


def _state(c_in: int, c_out: int, *, bias: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = {"channel_mapper.weight": torch.randn(c_out, c_in, 1, 1, generator=g)}
    if bias:
        state["channel_mapper.bias"] = torch.randn(c_out, generator=g)
    return state


def _reference(onehot: torch.Tensor, n_stages: int, state: dict[str, torch.Tensor]) -> torch.Tensor:
    # bilinear x0.5 (align_corners=False) samples source point 2i + 0.5: the mean of pixels 2i and 2i+1,
    # i.e. a 2x2 average pool; then the 1x1 conv is a per-pixel matrix product
    x = onehot
    for _ in range(n_stages):
        x = F.avg_pool2d(x, 2)
    w = state["channel_mapper.weight"][:, :, 0, 0]
    out = torch.einsum("oc,bchw->bohw", w, x)
    if "channel_mapper.bias" in state:
        out = out + state["channel_mapper.bias"][None, :, None, None]
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_integer_map_matches_closed_form(bias: bool) -> None:
    c_in, c_out = 5, 3
    enc = SpatialRescaler(n_stages=2, in_channels=c_in, out_channels=c_out, bias=bias)
    state = _state(c_in, c_out, bias=bias)
    enc.load_state_dict(state, strict=True)
    labels = torch.randint(0, c_in, (2, 16, 12), generator=torch.Generator().manual_seed(0))
    out = enc(labels)
    assert out.shape == (2, 3, 4, 3)
    # one-hot written by hand: channel k is (labels == k)
    onehot = torch.stack([(labels == k).float() for k in range(c_in)], dim=1)
    torch.testing.assert_close(out, _reference(onehot, 2, state), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc(onehot), out)
    enc.contract().check(out, batch=2, image_hw=(16, 12))


def test_contract_and_keys() -> None:
    enc = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3)  # semantic_synthesis256
    c = enc.contract()
    assert (c.kind, c.channels, c.latent_factor) == ("concat", 3, 4)
    assert sorted(enc.state_dict()) == ["channel_mapper.weight"]
    assert (enc.modality, enc.trainable) == ("semantic", True)
    no_map = SpatialRescaler(n_stages=3, in_channels=7)
    assert no_map.contract().channels == 7 and no_map.contract().latent_factor == 8
    assert dict(no_map.state_dict()) == {}
    assert SpatialRescaler(n_stages=1, multiplier=0.4).contract().latent_factor is None


def test_nearest_method_without_mapper() -> None:
    enc = SpatialRescaler(n_stages=1, method="nearest", in_channels=4)
    labels = torch.arange(16).reshape(1, 4, 4) % 4
    out = enc(labels)
    # torch nearest with scale_factor 0.5 reads source pixel floor(i / 0.5) = 2i
    expected = F.one_hot(labels[:, ::2, ::2], 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(out, expected)


def test_errors() -> None:
    enc = SpatialRescaler(n_stages=1, in_channels=4, out_channels=2)
    with pytest.raises(ValueError, match=r"labels \[4, 9\] out of range; valid labels are 0\.\.3"):
        enc(torch.tensor([[[0, 4], [9, 1]]]))
    with pytest.raises(ValueError, match=r"must be \[B, 4, H, W\]"):
        enc(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        enc(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown interpolation method 'cubic'"):
        SpatialRescaler(method="cubic")
    with pytest.raises(ValueError, match="never trained without it"):
        enc.unconditional(1)
