"""Fixtures for tests/diffusion: Stable Diffusion's schedule and its float64 reference tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig


@pytest.fixture
def schedule() -> DiffusionSchedule:
    return DiffusionSchedule.from_config(DiffusionConfig(linear_start=0.00085, linear_end=0.012))


@pytest.fixture
def ref_alpha_bar() -> torch.Tensor:
    """alpha_bar in float64 from the closed form of CompVis "linear" betas, independent of schedule.py."""
    i = np.arange(1000, dtype=np.float64)
    betas = (0.00085**0.5 + i / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2
    return torch.from_numpy(np.cumprod(1 - betas))
