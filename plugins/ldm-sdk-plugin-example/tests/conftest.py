"""Fixtures of the example plugin's tests: a Stable-Diffusion schedule and a toy network.

The ``ldm_runtime`` / ``ldm_runtime_with_entrypoints`` / ``tiny_sd_bundle`` fixtures come from the ``ldm_sdk``
pytest plugin, which pytest loads by itself wherever ldm-sdk is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def schedule() -> DiffusionSchedule:
    # Stable Diffusion's: CompVis "linear" (linear in sqrt(beta)) = diffusers "scaled_linear"
    return DiffusionSchedule.from_config(DiffusionConfig(linear_start=0.00085, linear_end=0.012))


@pytest.fixture
def model_fn() -> ModelFn:
    """A fixed nonlinear function of x and t (not a real UNet) that both samplers and references call."""
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1234)) / 2

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        t = torch.as_tensor(t).to(x.device, x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)) * torch.cos(t / 300) + 0.1 * x

    return fn


@pytest.fixture
def noise() -> Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
