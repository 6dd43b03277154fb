"""Ancestral DDPM against a hand-written float64 posterior-sampling loop (Ho et al. 2020, Eq. 6-7).

diffusers' DDPMScheduler computes the standard deviation as ``variance ** 0.5`` (clamped at 1e-20) where
CompVis uses ``exp(0.5 * log(max(variance, 1e-20)))``; the reference follows CompVis's definition, from
float64 betas independently of our buffers.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.schedule import make_beta_schedule
from ldm_sdk.samplers import ddpm


def reference(model_fn, x, start, generator, clip=False):
    betas = torch.from_numpy(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    ab = torch.cumprod(1 - betas, 0)
    x = x.double()
    for t in range(start, -1, -1):
        beta, a, a_prev = float(betas[t]), float(ab[t]), float(ab[t - 1]) if t > 0 else 1.0
        eps = model_fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float64), Conditioning())
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
        var = beta * (1 - a_prev) / (1 - a)
        x = mean
        if t > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
            x = x + math.exp(0.5 * math.log(max(var, 1e-20))) * noise
    return x


@pytest.mark.parametrize(("start", "clip"), [(999, False), (999, True), (120, False)])
def test_matches_posterior_loop(schedule, model_fn, noise, rel_err, start, clip) -> None:
    ref = reference(model_fn, noise, start, torch.Generator().manual_seed(4), clip)
    den = ModelDenoiser(model_fn, schedule, clip_x0=clip)
    timesteps = torch.arange(start, -1, -1, dtype=torch.float64)
    ours = ddpm.sample(den, noise, timesteps, generator=torch.Generator().manual_seed(4))
    assert rel_err(ours, ref) < 1e-5


def test_rejects_strided_timesteps(schedule, model_fn, noise) -> None:
    with pytest.raises(ValueError, match="consecutive integer"):
        ddpm.sample(ModelDenoiser(model_fn, schedule), noise, torch.tensor([20.0, 10.0, 0.0]))
    with pytest.raises(ValueError, match="consecutive integer"):
        ddpm.sample(ModelDenoiser(model_fn, schedule), noise, torch.tensor([2.5, 1.5, 0.5]))


def test_no_noise_drawn_at_t_zero(schedule, model_fn, noise) -> None:
    # exp(0.5 * log(1e-20)) would make noise at t = 0 invisible in the result: count the draws instead
    gen = torch.Generator().manual_seed(8)
    ddpm.sample(ModelDenoiser(model_fn, schedule), noise, torch.arange(4, -1, -1), generator=gen)
    replay = torch.Generator().manual_seed(8)
    for _ in range(4):  # t = 4, 3, 2, 1
        torch.randn(noise.shape, generator=replay)
    assert torch.equal(gen.get_state(), replay.get_state())
