"""The sampler contract shared by every built-in sampler: callbacks, cancellation, determinism, registry."""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.samplers import SAMPLERS, SamplingCancelled, StepInfo
from ldm_sdk.samplers.base import ddim_timesteps

EXTRA_CALLS_IN_FIRST_STEP = {"plms": 1}  # PLMS's pseudo improved Euler step calls the model twice
STOCHASTIC = {"ddpm": {}, "ddim": {"eta": 1.0}, "euler_ancestral": {}}


def timesteps_for(name: str):
    return torch.arange(9, -1, -1, dtype=torch.float64) + 40 if name == "ddpm" else ddim_timesteps(6)


def test_registry_names_and_signatures() -> None:
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "dpmpp_2m", "euler_ancestral"}
    for fn in SAMPLERS.values():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["denoiser", "x", "timesteps"]
        assert params["callback"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["generator"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_once_per_step(schedule, model_fn, noise, name) -> None:
    infos: list[StepInfo] = []
    timesteps = timesteps_for(name)
    out = SAMPLERS[name](
        ModelDenoiser(model_fn, schedule),
        noise,
        timesteps,
        callback=infos.append,
        generator=torch.Generator(),
    )
    assert [i.step for i in infos] == list(range(len(timesteps)))
    assert all(i.total == len(timesteps) for i in infos)
    assert [float(i.t) for i in infos] == timesteps.tolist()
    assert torch.equal(infos[-1].x, out)
    assert all(i.x.shape == noise.shape and i.x0.shape == noise.shape for i in infos)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("cancel_at", [0, 3])
def test_cancel_from_callback_stops_immediately(schedule, model_fn, noise, name, cancel_at) -> None:
    calls = []

    def counting(x, t, cond):
        calls.append(t)
        return model_fn(x, t, cond)

    def callback(info: StepInfo) -> None:
        if info.step == cancel_at:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        SAMPLERS[name](
            ModelDenoiser(counting, schedule), noise, timesteps_for(name), callback=callback, generator=None
        )
    assert len(calls) == cancel_at + 1 + EXTRA_CALLS_IN_FIRST_STEP.get(name, 0)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_generator_determinism(schedule, model_fn, noise, name) -> None:
    def run(seed: int) -> torch.Tensor:
        den = ModelDenoiser(model_fn, schedule)
        gen = torch.Generator().manual_seed(seed)
        return SAMPLERS[name](den, noise, timesteps_for(name), generator=gen, **STOCHASTIC[name])

    torch.manual_seed(123)  # the global RNG must not matter
    first = run(1)
    torch.manual_seed(456)
    assert torch.equal(first, run(1))
    assert not torch.allclose(first, run(2))
