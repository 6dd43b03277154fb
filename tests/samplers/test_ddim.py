"""DDIM against diffusers' DDIMScheduler configured to reproduce CompVis, and against the paper's equation.

diffusers gets our betas through ``trained_betas`` (it then recomputes alpha_bar in float32; the tables
agree to ~1e-6). ``steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading"`` reproduce CompVis's
timesteps (``+1`` offset) and its last step to ``alpha_bar[0]``.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.schedule import make_beta_schedule
from ldm_sdk.samplers import ddim
from ldm_sdk.samplers.base import ddim_timesteps

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_ddim(schedule, model_fn, x, n, eta, prediction_type, generator):
    sched = DDIMScheduler(
        trained_betas=schedule.betas.numpy(),
        steps_offset=1,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    sched.set_timesteps(n)
    for t in sched.timesteps:
        out = model_fn(x, t.float().expand(x.shape[0]), Conditioning())
        x = sched.step(out, t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize(
    ("param", "eta", "n"),
    [("eps", 0.0, 10), ("eps", 1.0, 10), ("eps", 0.5, 25), ("v", 0.0, 10), ("v", 1.0, 10), ("x0", 0.0, 10)],
)
def test_matches_diffusers(schedule, model_fn, noise, rel_err, param, eta, n) -> None:
    ref = diffusers_ddim(
        schedule, model_fn, noise, n, eta, PREDICTION_TYPES[param], torch.Generator().manual_seed(3)
    )
    den = ModelDenoiser(model_fn, schedule, param)
    ours = ddim.sample(den, noise, ddim_timesteps(n), eta=eta, generator=torch.Generator().manual_seed(3))
    assert ours.shape == noise.shape and ours.dtype == torch.float32
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_quad_spacing_matches_paper_equation(schedule, model_fn, noise, rel_err, eta) -> None:
    # diffusers has no "quad" spacing: a hand-written float64 DDIM loop (Song et al. Eq. 12) is the reference
    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    ab = torch.cumprod(torch.from_numpy(1 - betas), 0)
    steps = [1, 10, 40, 89, 159, 247, 356, 484, 633, 801][::-1]  # int((k sqrt(800) / 9) ** 2) + 1
    gen = torch.Generator().manual_seed(11)
    x = noise.double()
    for i, t in enumerate(steps):
        a = float(ab[t])
        a_prev = float(ab[steps[i + 1]]) if i + 1 < len(steps) else float(ab[0])
        eps = model_fn(x, torch.full((2,), float(t), dtype=torch.float64), Conditioning())
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen, dtype=torch.float32).double()
    den = ModelDenoiser(model_fn, schedule, "eps")
    timesteps = ddim_timesteps(10, method="quad")
    ours = ddim.sample(den, noise, timesteps, eta=eta, generator=torch.Generator().manual_seed(11))
    assert rel_err(ours, x) < 1e-5


def test_float64_state_stays_float64(schedule, model_fn, noise) -> None:
    ours = ddim.sample(ModelDenoiser(model_fn, schedule), noise.double(), ddim_timesteps(5))
    assert ours.dtype == torch.float64


def test_zero_steps_return_the_input(schedule, model_fn, noise) -> None:
    out = ddim.sample(ModelDenoiser(model_fn, schedule), noise, torch.zeros(0))
    assert torch.equal(out, noise)


def test_rejects_bad_arguments(schedule, model_fn, noise) -> None:
    den = ModelDenoiser(model_fn, schedule)
    with pytest.raises(ValueError, match="descending"):
        ddim.sample(den, noise, torch.tensor([1.0, 500.0]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        ddim.sample(den, noise, torch.tensor([1000.0, 1.0]))
    with pytest.raises(ValueError, match="eta"):
        ddim.sample(den, noise, ddim_timesteps(10), eta=-1.0)


def test_eta_zero_draws_no_noise(schedule, model_fn, noise) -> None:
    gen = torch.Generator().manual_seed(8)
    before = gen.get_state()
    ddim.sample(ModelDenoiser(model_fn, schedule), noise, ddim_timesteps(5), eta=0.0, generator=gen)
    assert torch.equal(gen.get_state(), before)
