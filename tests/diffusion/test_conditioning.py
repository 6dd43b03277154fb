"""Conditioning routing as CompVis DiffusionWrapper does it, and the batch helpers used by guidance."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning, apply_model, bind_unet


class RecordingUNet:
    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x, t, kwargs))
        return x[:, :2]


X = torch.randn(2, 2, 4, 4)
T = torch.tensor([10.0, 20.0])
CTX = torch.randn(2, 3, 8)
MAPS = torch.randn(2, 5, 4, 4)
Y = torch.tensor([1, 7])


@pytest.mark.parametrize(
    ("key", "cond", "channels", "kwargs"),
    [
        (None, Conditioning(), 2, {}),
        ("concat", Conditioning(concat=MAPS), 7, {}),
        ("crossattn", Conditioning(crossattn=CTX), 2, {"context": CTX}),
        ("hybrid", Conditioning(crossattn=CTX, concat=MAPS), 7, {"context": CTX}),
        ("adm", Conditioning(y=Y), 2, {"y": Y}),
        ("hybrid-adm", Conditioning(crossattn=CTX, concat=MAPS, y=Y), 7, {"context": CTX, "y": Y}),
        ("crossattn-adm", Conditioning(crossattn=CTX, y=Y), 2, {"context": CTX, "y": Y}),
    ],
)
def test_routing(key, cond, channels, kwargs) -> None:
    unet = RecordingUNet()
    apply_model(unet, X, T, cond, key)
    ((x, t, got),) = unet.calls
    assert x.shape[1] == channels and torch.equal(x[:, :2], X) and t is T
    if channels > 2:
        assert torch.equal(x[:, 2:], MAPS)  # CompVis: torch.cat([x] + c_concat, dim=1)
    assert got.keys() == kwargs.keys() and all(got[k] is v for k, v in kwargs.items())


def test_missing_unused_and_unknown_parts() -> None:
    unet = RecordingUNet()
    with pytest.raises(ValueError, match=r"missing \['crossattn'\]"):
        apply_model(unet, X, T, Conditioning(), "crossattn")
    with pytest.raises(ValueError, match=r"unused \['y'\]"):
        apply_model(unet, X, T, Conditioning(crossattn=CTX, y=Y), "crossattn")
    with pytest.raises(ValueError, match="valid: None, 'concat'"):
        apply_model(unet, X, T, Conditioning(), "film")
    with pytest.raises(ValueError, match="spatial size"):
        apply_model(unet, X, T, Conditioning(concat=MAPS[:, :, :2]), "concat")
    with pytest.raises(ValueError, match="valid"):
        bind_unet(unet, "film")
    assert not unet.calls


def test_bind_unet() -> None:
    unet = RecordingUNet()
    bind_unet(unet, "crossattn")(X, T, Conditioning(crossattn=CTX))
    assert unet.calls[0][2]["context"] is CTX


def test_cat_expand_and_batch_size() -> None:
    a = Conditioning(crossattn=torch.zeros(1, 3, 8), y=torch.tensor([0]))
    b = Conditioning(crossattn=CTX, y=Y)
    assert a.batch_size == 1 and b.batch_size == 2 and Conditioning().batch_size is None
    both = Conditioning.cat(a.expand(2), b)
    assert both.batch_size == 4 and both.concat is None
    assert torch.equal(both.crossattn[2:], CTX) and torch.equal(both.crossattn[:2], torch.zeros(2, 3, 8))
    assert both.y.tolist() == [0, 0, 1, 7]
    assert b.expand(2) is b
    with pytest.raises(ValueError, match="only batch 1"):
        b.expand(4)
    with pytest.raises(ValueError, match="different parts"):
        Conditioning.cat(Conditioning(crossattn=CTX), b)
    with pytest.raises(ValueError, match="beyond the batch"):
        Conditioning.cat(Conditioning(crossattn=torch.zeros(2, 4, 8)), Conditioning(crossattn=CTX))
    with pytest.raises(ValueError, match="disagree"):
        _ = Conditioning(crossattn=CTX, y=torch.tensor([1])).batch_size


def test_to_keeps_integer_labels() -> None:
    moved = Conditioning(crossattn=CTX, y=Y).to(dtype=torch.float64)
    assert moved.crossattn.dtype == torch.float64 and moved.y.dtype == torch.int64


def test_with_concat_replaces_only_the_concat_part() -> None:
    ctx, y = torch.zeros(2, 3, 4), torch.tensor([1, 2])
    old, new = torch.zeros(2, 5, 4, 4), torch.ones(2, 5, 4, 4)
    cond = Conditioning(crossattn=ctx, concat=old, y=y)
    out = cond.with_concat(new)
    assert out.crossattn is ctx and out.y is y and out.concat is new and cond.concat is old
    assert cond.with_concat(None).parts().keys() == {"crossattn", "y"}
