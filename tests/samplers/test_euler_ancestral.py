"""Euler ancestral against diffusers' EulerAncestralDiscreteScheduler.

diffusers keeps the state in sigma space and starts from ``noise * init_noise_sigma``; with "linspace"
spacing that is ``sigma_max`` (not ``sqrt(1 + sigma_max^2)``), so our VP start is
``noise * sigma_max / sqrt(1 + sigma_max^2)``. The linspace cases use step counts whose timesteps are
integers: at fractional timesteps diffusers interpolates sigma linearly, our schedule (like k-diffusion)
log-linearly. EulerAncestralDiscreteScheduler has no ``use_karras_sigmas`` in diffusers 0.42.1, so the
Karras case takes sigmas and timesteps from EulerDiscreteScheduler(use_karras_sigmas=True) and sets them
on the ancestral scheduler.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.samplers import euler_ancestral
from ldm_sdk.samplers.base import karras_timesteps, linspace_timesteps

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run_diffusers(sched, model_fn, noise, generator):
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(x.shape[0]), Conditioning())
        x = sched.step(out, t, x, generator=generator).prev_sample
    return x


def vp_start(noise, sigma_max):
    return noise * sigma_max / (1 + sigma_max**2) ** 0.5


@pytest.mark.parametrize(("param", "n"), [("eps", 10), ("eps", 28), ("v", 10)])
def test_matches_diffusers_linspace(schedule, model_fn, noise, rel_err, param, n) -> None:
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[param]
    sched = EulerAncestralDiscreteScheduler(
        trained_betas=schedule.betas.numpy(), prediction_type=prediction_type
    )
    sched.set_timesteps(n)
    ref = run_diffusers(sched, model_fn, noise, torch.Generator().manual_seed(5))
    timesteps = linspace_timesteps(n)
    assert torch.equal(timesteps, timesteps.round())  # integer timesteps for these n
    den = ModelDenoiser(model_fn, schedule, param)
    x = vp_start(noise, float(sched.sigmas.max()))
    ours = euler_ancestral.sample(den, x, timesteps, generator=torch.Generator().manual_seed(5))
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("n", [10, 15])
def test_matches_diffusers_karras(schedule, model_fn, noise, rel_err, n) -> None:
    karras = EulerDiscreteScheduler(trained_betas=schedule.betas.numpy(), use_karras_sigmas=True)
    karras.set_timesteps(n)
    sched = EulerAncestralDiscreteScheduler(trained_betas=schedule.betas.numpy())
    sched.set_timesteps(n)
    sched.sigmas, sched.timesteps = karras.sigmas.clone(), karras.timesteps.clone()
    ref = run_diffusers(sched, model_fn, noise, torch.Generator().manual_seed(9))
    x = vp_start(noise, float(sched.sigmas.max()))
    ours = euler_ancestral.sample(
        ModelDenoiser(model_fn, schedule),
        x,
        karras_timesteps(schedule, n),
        generator=torch.Generator().manual_seed(9),
    )
    assert rel_err(ours, ref) < 1e-5


def test_eta_zero_is_euler(schedule, model_fn, noise, rel_err) -> None:
    # eta = 0 removes the ancestral noise: diffusers' (deterministic) EulerDiscreteScheduler is the reference
    sched = EulerDiscreteScheduler(trained_betas=schedule.betas.numpy())
    sched.set_timesteps(10)
    ref = run_diffusers(sched, model_fn, noise, None)
    x = vp_start(noise, float(sched.sigmas.max()))
    ours = euler_ancestral.sample(ModelDenoiser(model_fn, schedule), x, linspace_timesteps(10), eta=0.0)
    assert rel_err(ours, ref) < 1e-5
