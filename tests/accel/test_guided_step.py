"""``ldm_sdk.accel.guided_step``: the whole guided denoiser call as one captured function.

The independent reference is the eager ``ModelDenoiser(ClassifierFreeGuidance(...))`` of
``ldm_sdk.diffusion``: the captured step must give the same bits (float32, CPU, emulated capture), for every
parameterization, at integer and fractional timesteps, with the prompt, negative prompt and scale changing
between calls of one graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.guided_step import GuidedPrediction, guided_denoiser
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig
from ldm_sdk.samplers import SAMPLERS
from ldm_sdk.samplers.base import ddim_timesteps

SCHEDULE = DiffusionSchedule.from_config(DiffusionConfig(linear_start=0.00085, linear_end=0.012))


def network(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """A nonlinear stand-in for a UNet: fp16 output (as a half-precision model), depends on x, t, context."""
    ctx = cond.crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return (torch.tanh(x * (1 + ctx)) * torch.cos(t / 300).reshape(-1, 1, 1, 1) + ctx).half()


def conds(seed: int, batch: int = 1) -> tuple[Conditioning, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    return (
        Conditioning(crossattn=torch.randn(batch, 5, 8, generator=g)),
        Conditioning(crossattn=torch.randn(1, 5, 8, generator=g)),
    )


def assert_same(a: Tensor, b: Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_prediction_equals_the_eager_denoiser_bit_for_bit(param: str) -> None:
    cond, uncond = conds(0, batch=2)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    for t_value, scale in ((981.0, 7.5), (400.25, 3.3), (1.0, -2.0)):
        t = torch.full((2,), t_value, dtype=torch.float64)
        eager = ModelDenoiser(ClassifierFreeGuidance(network, scale, uncond), SCHEDULE, param, cond)(x, t)
        c2 = Conditioning.cat(uncond.expand(2), cond)
        ts = torch.stack([t, torch.full((2,), scale, dtype=torch.float64)])
        out = GuidedPrediction(network, SCHEDULE, param)(x, ts, c2)  # type: ignore[arg-type]
        assert out.shape == (2, *x.shape)
        assert_same(out[0], eager.eps)
        assert_same(out[1], eager.x0)


def test_one_graph_serves_every_prompt_and_scale() -> None:
    captured = CapturedModel(network, mode="emulate")
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    t = torch.full((1,), 501.0, dtype=torch.float64)
    for seed, scale in ((0, 7.5), (1, 7.5), (2, 1.5), (3, 12.0)):
        cond, uncond = conds(seed)
        den = guided_denoiser(captured, SCHEDULE, "eps", cond, uncond, scale)
        eager = ModelDenoiser(ClassifierFreeGuidance(network, scale, uncond), SCHEDULE, "eps", cond)(x, t)
        pred = den(x, t)
        assert_same(pred.eps, eager.eps)
        assert_same(pred.x0, eager.x0)
    (step,) = captured.companions.values()
    assert step.stats.captures == 1 and step.stats.replays == 4
    assert captured.stats.captures == 0  # the network's own graphs are not used
    # same schedule and parameterization: the same companion; another batch: a second capture
    cond, uncond = conds(4, batch=3)
    guided_denoiser(captured, SCHEDULE, "eps", cond, uncond, 2.0)(x.expand(3, -1, -1, -1), t.expand(3))
    assert captured.companions == {next(iter(captured.companions)): step}
    assert step.stats.captures == 2
    guided_denoiser(captured, SCHEDULE, "v", cond, uncond, 2.0)
    assert len(captured.companions) == 2
    captured.clear()
    assert all(not c.signatures for c in captured.companions.values())


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m"])
def test_sampling_through_the_captured_step_equals_eager(sampler: str) -> None:
    """Multistep samplers keep earlier predictions: the captured step hands out fresh tensors."""
    cond, uncond = conds(5)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    steps = ddim_timesteps(6)
    eager = ModelDenoiser(ClassifierFreeGuidance(network, 7.5, uncond), SCHEDULE, "eps", cond)
    fast = guided_denoiser(CapturedModel(network, mode="emulate"), SCHEDULE, "eps", cond, uncond, 7.5)
    with torch.inference_mode():
        assert_same(SAMPLERS[sampler](fast, x, steps), SAMPLERS[sampler](eager, x, steps))


def test_errors() -> None:
    cond, uncond = conds(7)
    captured = CapturedModel(network, mode="emulate")
    with pytest.raises(ValueError, match="finite"):
        guided_denoiser(captured, SCHEDULE, "eps", cond, uncond, float("inf"))

    def wrong(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        return x[:, :2]

    den = guided_denoiser(CapturedModel(wrong, mode="emulate"), SCHEDULE, "eps", cond, uncond, 2.0)
    with pytest.raises(ValueError, match="must return x's shape"):
        den(torch.zeros(1, 4, 6, 6), torch.full((1,), 3.0, dtype=torch.float64))


def test_shared_input_matches_the_batched_call() -> None:
    """``share_input``: the network gets x once and the [uncond; cond] context; a cross-attention UNet
    then equals the batched call (float32 order aside), and a captured step runs it."""
    from ldm_sdk.benchmarks.common import randomize_
    from ldm_sdk.diffusion.conditioning import bind_unet
    from ldm_sdk.models.unet import UNetModel
    from ldm_sdk.testing.tiny import tiny_unet

    config = tiny_unet(4, 4, num_heads=2, use_spatial_transformer=True, context_dim=24)
    unet = UNetModel.from_config(config).eval().requires_grad_(False)
    randomize_(unet, torch.Generator().manual_seed(0))
    fn = bind_unet(unet, "crossattn")
    g = torch.Generator().manual_seed(2)
    cond = Conditioning(crossattn=torch.randn(2, 5, 24, generator=g))
    uncond = Conditioning(crossattn=torch.randn(1, 5, 24, generator=g))
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.full((2,), 600.0, dtype=torch.float64)
    ts = torch.stack([t, torch.full((2,), 7.5, dtype=torch.float64)])
    c2 = Conditioning.cat(uncond.expand(2), cond)
    with torch.no_grad():
        batched = GuidedPrediction(fn, SCHEDULE, "eps")(x, ts, c2)
        shared = GuidedPrediction(fn, SCHEDULE, "eps", share_input=True)(x, ts, c2)
        torch.testing.assert_close(shared, batched, rtol=1e-4, atol=1e-4)  # x0 amplifies eps x 3
        den = guided_denoiser(
            CapturedModel(fn, mode="emulate"), SCHEDULE, "eps", cond, uncond, 7.5, share_input=True
        )
        pred = den(x, t)
    torch.testing.assert_close(pred.eps, batched[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cross-attention-only"):
        concat = Conditioning(concat=torch.zeros(2, 1, 8, 8))
        GuidedPrediction(fn, SCHEDULE, "eps", share_input=True)(x, ts, concat)
