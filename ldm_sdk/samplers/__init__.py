"""Samplers, one file per paper; each is a plain function over a denoiser."""

from __future__ import annotations

from collections.abc import Callable

from ldm_sdk.samplers import ddim, ddpm, dpmpp_2m, euler_ancestral, plms
from ldm_sdk.samplers.base import (
    SamplingCancelled,
    StepCallback,
    StepInfo,
    ddim_timesteps,
    karras_timesteps,
    linspace_timesteps,
)

SAMPLERS: dict[str, Callable[..., object]] = {
    "ddpm": ddpm.sample,
    "ddim": ddim.sample,
    "plms": plms.sample,
    "dpmpp_2m": dpmpp_2m.sample,
    "euler_ancestral": euler_ancestral.sample,
}
"""Built-in samplers by name: ``sample(denoiser, x, timesteps, *, callback=None, generator=None, ...)``."""

__all__ = [
    "SAMPLERS",
    "SamplingCancelled",
    "StepCallback",
    "StepInfo",
    "ddim_timesteps",
    "karras_timesteps",
    "linspace_timesteps",
]
