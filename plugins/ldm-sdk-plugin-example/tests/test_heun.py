"""The Heun sampler against diffusers' HeunDiscreteScheduler and against a float64 loop of Algorithm 2.

diffusers keeps the state in sigma space and starts from ``noise * init_noise_sigma`` (``sigma_max`` with
"linspace" spacing), so our VP start is ``noise * sigma_max / sqrt(1 + sigma_max^2)``. The linspace cases use
step counts whose timesteps are integers (diffusers interpolates sigma linearly at fractional timesteps, the
SDK's schedule log-linearly).
"""

from __future__ import annotations

import math

import pytest
import torch
from ldm_sdk_plugin_example import heun

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.samplers.base import SamplingCancelled, StepInfo, karras_timesteps, linspace_timesteps

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def run_diffusers(sched, model_fn, noise):
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(x.shape[0]), Conditioning())
        x = sched.step(out, t, x).prev_sample
    return x


def vp_start(noise, sigma_max):
    return noise * sigma_max / (1 + sigma_max**2) ** 0.5


@pytest.mark.parametrize(("param", "n"), [("eps", 10), ("eps", 28), ("v", 10)])
def test_matches_diffusers_linspace(schedule, model_fn, noise, param, n) -> None:
    diffusers = pytest.importorskip("diffusers")
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[param]
    sched = diffusers.HeunDiscreteScheduler(
        trained_betas=schedule.betas.numpy(), prediction_type=prediction_type
    )
    sched.set_timesteps(n)
    ref = run_diffusers(sched, model_fn, noise)
    timesteps = linspace_timesteps(n)
    assert torch.equal(timesteps, timesteps.round())
    x = vp_start(noise, float(sched.sigmas.max()))
    ours = heun.sample(ModelDenoiser(model_fn, schedule, param), x, timesteps)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("n", [8, 15])
def test_matches_diffusers_karras(schedule, model_fn, noise, n) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.HeunDiscreteScheduler(trained_betas=schedule.betas.numpy(), use_karras_sigmas=True)
    sched.set_timesteps(n)
    ref = run_diffusers(sched, model_fn, noise)
    x = vp_start(noise, float(sched.sigmas.max()))
    ours = heun.sample(ModelDenoiser(model_fn, schedule), x, karras_timesteps(schedule, n))
    assert rel_err(ours, ref) < 1e-5


def algorithm_2(model_fn, schedule, noise, ts, *, second_order=True):
    """Karras et al. Algorithm 2 (S_churn = 0) from the paper, in sigma space, float64 throughout, with
    D(x; sigma) from the eps network; ``second_order=False`` is the plain Euler method (Algorithm 2 without
    the correction)."""
    ab = schedule.alpha_bar(ts).double()
    sigmas = [*((1 - ab) / ab).sqrt().tolist(), 0.0]

    def denoise(x_s, i):
        s = sigmas[i]
        eps = model_fn(x_s / math.sqrt(1 + s * s), ts[i].expand(x_s.shape[0]).double(), Conditioning())
        return x_s - s * eps

    x = noise.double() * sigmas[0]
    for i in range(len(ts)):
        d = (x - denoise(x, i)) / sigmas[i]
        x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        if second_order and sigmas[i + 1] != 0:
            d2 = (x_next - denoise(x_next, i + 1)) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + d2) / 2
        x = x_next
    return x, noise.double() * sigmas[0] / math.sqrt(1 + sigmas[0] ** 2)


def test_matches_a_float64_loop_of_algorithm_2(schedule, model_fn, noise) -> None:
    ts = linspace_timesteps(12)
    ref, start = algorithm_2(model_fn, schedule, noise, ts)
    ours = heun.sample(ModelDenoiser(model_fn, schedule), start, ts)
    assert ours.dtype == torch.float64
    # 1e-6, not 1e-12: at integer t the SDK's denoiser takes sqrt(alpha_bar) from CompVis' float32 buffers
    assert rel_err(ours, ref) < 1e-6
    # and the comparison can tell a 2nd-order method from a 1st-order one on the same steps
    euler, _ = algorithm_2(model_fn, schedule, noise, ts, second_order=False)
    assert rel_err(euler, ref) > 1e-3


def test_calls_the_model_twice_per_step_but_the_last(schedule, model_fn, noise) -> None:
    calls, infos = [], []

    def counting(x, t, cond):
        calls.append(float(t[0]))
        return model_fn(x, t, cond)

    ts = linspace_timesteps(6)
    heun.sample(ModelDenoiser(counting, schedule), noise, ts, callback=infos.append)
    assert len(calls) == 2 * 6 - 1
    assert calls[::2] == ts.tolist() and calls[1::2] == ts[1:].tolist()
    assert [i.step for i in infos] == list(range(6)) and all(isinstance(i, StepInfo) for i in infos)
    assert all(i.total == 6 for i in infos)


def test_deterministic_and_cancellable(schedule, model_fn, noise) -> None:
    den = ModelDenoiser(model_fn, schedule)
    ts = linspace_timesteps(5)
    a = heun.sample(den, noise, ts, generator=torch.Generator().manual_seed(1))
    b = heun.sample(den, noise, ts, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)

    def cancel(info: StepInfo) -> None:
        if info.step == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        heun.sample(den, noise, ts, callback=cancel)


def test_zero_steps_return_the_input_and_bad_timesteps_are_refused(schedule, model_fn, noise) -> None:
    den = ModelDenoiser(model_fn, schedule)
    assert torch.equal(heun.sample(den, noise, torch.zeros(0)), noise)
    with pytest.raises(ValueError, match="descending"):
        heun.sample(den, noise, torch.tensor([10.0, 500.0]))
