"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", order 2).

With Karras sigmas diffusers rounds the timesteps it hands the model to integers but keeps the unrounded
sigmas in the solver, so model and solver disagree on the noise level. We follow k-diffusion (the model is
called at the exact fractional timestep of each sigma); the test therefore gives the diffusers scheduler
those unrounded timesteps (from its own ``_sigma_to_t``) and compares everything else as is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.samplers import dpmpp_2m
from ldm_sdk.samplers.base import karras_timesteps, linspace_timesteps

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


def diffusers_dpmpp(schedule, model_fn, x, n, prediction_type, karras):
    sched = DPMSolverMultistepScheduler(
        trained_betas=schedule.betas.numpy(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="linspace",
        prediction_type=prediction_type,
        use_karras_sigmas=karras,
    )
    sched.set_timesteps(n)
    if karras:
        ac = sched.alphas_cumprod.numpy()
        log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
        sched.timesteps = torch.tensor([float(sched._sigma_to_t(s, log_sigmas)) for s in sched.sigmas[:-1]])
        sched.set_begin_index(0)
    for t in sched.timesteps:
        out = model_fn(x, t.float().expand(x.shape[0]), Conditioning())
        x = sched.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize(
    ("param", "n", "karras"),
    [
        ("eps", 10, False),
        ("eps", 20, False),
        ("eps", 3, False),
        ("v", 10, False),
        ("eps", 10, True),
        ("eps", 25, True),
        ("v", 10, True),
    ],
)
def test_matches_diffusers(schedule, model_fn, noise, rel_err, param, n, karras) -> None:
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[param]
    ref = diffusers_dpmpp(schedule, model_fn, noise, n, prediction_type, karras)
    timesteps = karras_timesteps(schedule, n) if karras else linspace_timesteps(n, include_zero=False)
    ours = dpmpp_2m.sample(ModelDenoiser(model_fn, schedule, param), noise, timesteps)
    assert rel_err(ours, ref) < 1e-5


def test_result_is_last_x0_estimate(schedule, model_fn, noise) -> None:
    steps: list = []
    out = dpmpp_2m.sample(
        ModelDenoiser(model_fn, schedule), noise, linspace_timesteps(5), callback=steps.append
    )
    assert torch.equal(out, steps[-1].x0)


def test_rejects_repeated_timesteps(schedule, model_fn, noise) -> None:
    with pytest.raises(ValueError, match="strictly descending"):
        dpmpp_2m.sample(ModelDenoiser(model_fn, schedule), noise, torch.tensor([500.0, 500.0, 1.0]))
