"""Timestep sequences against diffusers' schedulers and CompVis's closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from ldm_sdk.samplers.base import ddim_timesteps, karras_timesteps, linspace_timesteps

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("n", [10, 20, 50, 250])
def test_ddim_uniform_matches_diffusers_leading_with_offset(n: int) -> None:
    # CompVis make_ddim_timesteps(uniform) == diffusers DDIM "leading" + steps_offset=1 when T % n == 0
    sched = DDIMScheduler(steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(n)
    assert torch.equal(ddim_timesteps(n), sched.timesteps.double())


def test_ddim_uniform_keeps_compvis_extra_step() -> None:
    # CompVis: range(0, 1000, 1000 // 7) + 1 has 8 entries (diffusers would give 7); we follow CompVis
    expected = torch.tensor([995, 853, 711, 569, 427, 285, 143, 1], dtype=torch.float64)
    assert torch.equal(ddim_timesteps(7), expected)


@pytest.mark.parametrize(("n", "stride"), [(3, 333), (9, 111), (1000, 1)])
def test_ddim_uniform_drops_the_step_past_the_table(n: int, stride: int) -> None:
    # range(0, 1000, stride) + 1 ends at 1000 here: CompVis would index alphas_cumprod[1000] and fail
    expected = torch.tensor([1 + stride * k for k in range(999 // stride)], dtype=torch.float64).flip(0)
    assert torch.equal(ddim_timesteps(n), expected)


def test_ddim_quad_closed_form() -> None:
    # int((k * sqrt(0.8 T) / (n - 1)) ** 2) + 1 == 800 k^2 // 81 + 1 for T=1000, n=10 (exact integer math)
    expected = torch.tensor([800 * k * k // 81 + 1 for k in range(10)], dtype=torch.float64).flip(0)
    assert torch.equal(ddim_timesteps(10, method="quad"), expected)


def test_ddim_timesteps_errors() -> None:
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="uniform, quad"):
        ddim_timesteps(10, method="cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [10, 20, 37])
def test_linspace_with_zero_matches_euler_schedulers(n: int) -> None:
    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(n)
    assert torch.equal(linspace_timesteps(n), sched.timesteps.double())


@pytest.mark.parametrize("n", [10, 20, 25])
def test_linspace_without_zero_matches_dpmsolver(n: int) -> None:
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(n)
    assert torch.equal(linspace_timesteps(n, include_zero=False), sched.timesteps.double())


@pytest.mark.parametrize("n", [5, 10, 30])
def test_karras_matches_diffusers(schedule, n: int) -> None:
    sched = EulerDiscreteScheduler(trained_betas=schedule.betas.numpy(), use_karras_sigmas=True)
    sched.set_timesteps(n)
    ours = karras_timesteps(schedule, n)
    assert ours.dtype == torch.float64 and ours.shape == (n,)
    assert torch.all(ours[1:] < ours[:-1])
    # diffusers computes 1 - alpha_bar in float32, which costs ~1e-5 relative on sigma near t = 0
    sigma_err = (schedule.sigma(ours) / sched.sigmas[:-1].double() - 1).abs().max()
    assert sigma_err < 5e-5
    assert (ours - sched.timesteps.double()).abs().max() < 5e-3
