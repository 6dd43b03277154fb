"""Beta schedules and CompVis buffers against closed-form math; lookups at integer and fractional t."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS, DiffusionSchedule, make_beta_schedule
from ldm_sdk.models.configs import DiffusionConfig


def closed_form(kind: str, n: int, start: float, end: float, s: float = 8e-3) -> list[float]:
    if kind == "linear":  # linear in sqrt(beta)
        return [(start**0.5 + i / (n - 1) * (end**0.5 - start**0.5)) ** 2 for i in range(n)]
    if kind == "sqrt_linear":  # linear in beta
        return [start + i / (n - 1) * (end - start) for i in range(n)]
    if kind == "sqrt":
        return [(start + i / (n - 1) * (end - start)) ** 0.5 for i in range(n)]

    def f(t: float) -> float:  # Nichol & Dhariwal 2021, Eq. 17
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    return [min(1 - f(i + 1) / f(i), 0.999) for i in range(n)]


@pytest.mark.parametrize("kind", ["linear", "sqrt_linear", "sqrt", "cosine"])
@pytest.mark.parametrize("n", [10, 1000])
def test_betas_closed_form(kind: str, n: int) -> None:
    ours = make_beta_schedule(kind, n, 0.00085, 0.012)  # type: ignore[arg-type]
    assert ours.dtype == np.float64 and ours.shape == (n,)
    np.testing.assert_allclose(ours, closed_form(kind, n, 0.00085, 0.012), rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("linear", "scaled_linear"), ("sqrt_linear", "linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_betas_match_diffusers_names(ours: str, theirs: str) -> None:
    # CompVis "linear" is diffusers "scaled_linear"; CompVis "sqrt_linear" is diffusers "linear"
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=theirs).betas.double().numpy()
    np.testing.assert_allclose(make_beta_schedule(ours, 1000, 0.00085, 0.012), ref, rtol=2e-6)  # type: ignore[arg-type]


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ValueError, match="linear, cosine, sqrt_linear, sqrt"):
        make_beta_schedule("quadratic", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        make_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiffusionSchedule(np.array([0.1, 1.5]))


@pytest.mark.parametrize("v_posterior", [0.0, 0.3])
def test_buffers_against_formulas(v_posterior: float) -> None:
    betas = np.array(closed_form("linear", 1000, 0.00085, 0.012))
    sched = DiffusionSchedule(betas, v_posterior=v_posterior)
    ab, ab_prev = [], []
    prod = 1.0
    for b in betas:
        ab_prev.append(prod)
        prod *= 1 - b
        ab.append(prod)
    ab, ab_prev = np.array(ab), np.array(ab_prev)
    var = (1 - v_posterior) * betas * (1 - ab_prev) / (1 - ab) + v_posterior * betas
    expected = {
        "betas": betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": ab**0.5,
        "sqrt_one_minus_alphas_cumprod": (1 - ab) ** 0.5,
        "log_one_minus_alphas_cumprod": np.log(1 - ab),
        "sqrt_recip_alphas_cumprod": ab**-0.5,
        "sqrt_recipm1_alphas_cumprod": (1 / ab - 1) ** 0.5,
        "posterior_variance": var,
        "posterior_log_variance_clipped": np.log(np.maximum(var, 1e-20)),
        "posterior_mean_coef1": betas * ab_prev**0.5 / (1 - ab),
        "posterior_mean_coef2": (1 - ab_prev) * (1 - betas) ** 0.5 / (1 - ab),
    }
    state = sched.state_dict()
    assert list(state) == list(SCHEDULE_BUFFERS)
    for name, values in expected.items():
        assert state[name].dtype == torch.float32, name
        np.testing.assert_allclose(state[name].double().numpy(), values, rtol=1e-6, atol=1e-30, err_msg=name)


def test_alpha_bar_exact_at_integers(schedule: DiffusionSchedule) -> None:
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    assert torch.equal(schedule.alpha_bar(t), schedule.alphas_cumprod.double()[t.long()])


def test_fractional_t_interpolates_log_sigma(schedule: DiffusionSchedule, ref_alpha_bar) -> None:
    log_sigma = 0.5 * torch.log((1 - ref_alpha_bar) / ref_alpha_bar)
    t = torch.tensor([0.25, 10.5, 500.75, 998.9], dtype=torch.float64)
    low, w = t.floor().long(), t - t.floor()
    expected_sigma = ((1 - w) * log_sigma[low] + w * log_sigma[low + 1]).exp()
    torch.testing.assert_close(schedule.sigma(t), expected_sigma, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.alpha_bar(t), 1 / (1 + expected_sigma**2), rtol=1e-10, atol=0)


def test_sigma_to_t_round_trip(schedule: DiffusionSchedule) -> None:
    t = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    t = torch.cat([t, torch.tensor([0.0, 1.0, 998.5, 999.0], dtype=torch.float64)])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigma(t)), t, rtol=0, atol=1e-8)


def test_lookups_reject_out_of_range(schedule: DiffusionSchedule) -> None:
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.alpha_bar(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        schedule.sigma(torch.tensor([-0.5]))


def test_q_sample_formula(schedule: DiffusionSchedule, ref_alpha_bar) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([0, 500, 999])
    a = ref_alpha_bar[t].reshape(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(schedule.q_sample(x0, t, noise).double(), expected, rtol=1e-5, atol=1e-6)


def test_from_config_cosine() -> None:
    sched = DiffusionSchedule.from_config(DiffusionConfig(beta_schedule="cosine", timesteps=50))
    assert sched.num_timesteps == 50
    np.testing.assert_allclose(sched.betas.double().numpy(), closed_form("cosine", 50, 0, 0), rtol=1e-6)
