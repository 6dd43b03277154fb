"""Classifier-free guidance: one batched call equals u + s (c - u) from two separate calls."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance, guidance_combine

GEN = torch.Generator().manual_seed(0)
X = torch.randn(2, 4, 3, 3, generator=GEN)
T = torch.tensor([400.0, 400.0])
COND = Conditioning(crossattn=torch.randn(2, 5, 4, generator=GEN))
UNCOND = Conditioning(crossattn=torch.zeros(1, 5, 4))


class Model:
    """A nonlinear function of x, t and the context, recording the batch of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        ctx = cond.crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x * (1 + ctx)) * torch.cos(t / 300).reshape(-1, 1, 1, 1) + ctx


@pytest.mark.parametrize("scale", [7.5, 0.0, -1.0])
def test_matches_two_separate_calls(scale) -> None:
    model = Model()
    guided = ClassifierFreeGuidance(model, scale, UNCOND)(X, T, COND)
    assert model.batches == [4]  # one call on [uncond; cond]
    u = Model()(X, T, UNCOND.expand(2))
    c = Model()(X, T, COND)
    torch.testing.assert_close(guided, u + scale * (c - u), rtol=1e-6, atol=1e-6)


def test_scale_one_makes_one_conditional_call() -> None:
    model = Model()
    out = ClassifierFreeGuidance(model, 1.0, UNCOND)(X, T, COND)
    assert model.batches == [2]
    assert torch.equal(out, Model()(X, T, COND))


def test_rejects_mismatched_parts_and_bad_scale() -> None:
    with pytest.raises(ValueError, match="different parts"):
        ClassifierFreeGuidance(Model(), 5.0, Conditioning())(X, T, COND)
    with pytest.raises(ValueError, match="finite"):
        ClassifierFreeGuidance(Model(), float("nan"), UNCOND)


def test_half_precision_outputs_are_combined_in_float32() -> None:
    """fp16 outputs: ``u + s (c - u)`` formed in float32 from the upcast outputs and returned in float32
    (three fp16 ops would round after each and lose up to a few fp16 ulps at s = 7.5)."""
    model = Model()

    def half_model(x, t, cond):
        return model(x, t, cond).half()

    guided = ClassifierFreeGuidance(half_model, 7.5, UNCOND)(X, T, COND)
    assert guided.dtype == torch.float32
    u = Model()(X, T, UNCOND.expand(2)).half().double()
    c = Model()(X, T, COND).half().double()
    truth = u + 7.5 * (c - u)
    # float32 lerp: a few float32 ulps of the operands' scale
    assert ((guided.double() - truth).abs() <= 8 * 2**-24 * (c.abs() + 7.5 * (c - u).abs())).all()
    # the tensor-weight form (the captured step's per-sample scale) gives the same bits
    scale = torch.full((2, 1, 1, 1), 7.5)
    assert torch.equal(guidance_combine(u.half(), c.half(), scale), guided)
