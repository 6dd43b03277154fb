"""Fixtures for sampler tests: an SD-like schedule and a deterministic toy network (not a real UNet).

(Helpers are fixtures because test modules cannot import conftest under ``--import-mode=importlib``.)

The toy network is a fixed nonlinear function of ``x`` and ``t`` (``tanh(W x) cos(t / 300) + 0.1 x``); both
our samplers and the references (diffusers schedulers, hand-written loops) drive the very same function.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig

SHAPE = (2, 4, 8, 8)


def toy_model(channels: int = 4, seed: int = 1234) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
    weight = torch.randn(channels, channels, generator=torch.Generator().manual_seed(seed)) / channels**0.5

    def model_fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        t = torch.as_tensor(t).to(x.device, x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)
        return torch.tanh(h) * torch.cos(t / 300) + 0.1 * x

    return model_fn


def _rel_err(ours: Tensor, ref: Tensor) -> float:
    """max |ours - ref| / max |ref| (normwise, so values near zero do not blow it up)."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture
def rel_err() -> Callable[[Tensor, Tensor], float]:
    return _rel_err


@pytest.fixture
def make_toy_model() -> Callable[..., Callable[[Tensor, Tensor, Conditioning], Tensor]]:
    return toy_model


@pytest.fixture
def schedule() -> DiffusionSchedule:
    # Stable Diffusion's schedule: CompVis "linear" (linear in sqrt(beta)) = diffusers "scaled_linear"
    return DiffusionSchedule.from_config(DiffusionConfig(linear_start=0.00085, linear_end=0.012))


@pytest.fixture
def model_fn() -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
    return toy_model()


@pytest.fixture
def noise() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
