"""Euler ancestral: the Euler method of Karras, Aittala, Aila & Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models" (NeurIPS 2022), Algorithm 1 with ancestral noise, as k-diffusion
``sample_euler_ancestral``.

It runs in sigma ("VE") space, ``x_s = x_vp sqrt(1 + sigma^2)`` with ``sigma = sqrt((1 - ab) / ab)``; the
denoiser is called at the VP state. For ``sigma -> sigma_next``::

    sigma_up   = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))
    sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    x_s        = x_s + (x_s - x0) / sigma * (sigma_down - sigma) + s_noise sigma_up z

The step after the last timestep goes to ``sigma = 0`` (no noise), so the result is in VP and sigma space
alike.
"""

from __future__ import annotations

import math

from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser
from ldm_sdk.diffusion.noise import RandomSource
from ldm_sdk.samplers.base import (
    StepCallback,
    StepInfo,
    alpha_bars,
    check_timesteps,
    randn_like_state,
    start_state,
    time_batch,
)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` for an ancestral step (k-diffusion ``get_ancestral_step``)."""
    if eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
    generator: RandomSource | None = None,
) -> Tensor:
    """Euler ancestral from the VP state ``x`` at ``timesteps[0]`` down the descending ``timesteps`` and
    on to ``sigma = 0``. One ``randn`` from ``generator`` per step whose next sigma is positive (``eta > 0``);
    ``eta = 0`` is the plain (deterministic) Euler method. Returns the VP-space (= sigma-space) result."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    sigmas = [math.sqrt((1 - a) / a) for a in alpha_bars(schedule, ts)] + [0.0]
    x = start_state(x)
    total = ts.numel()
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoiser(x, time_batch(float(ts[i]), x))
        x_s = x * math.sqrt(1 + sigma**2)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        derivative = (x_s - pred.x0.to(x.dtype)) / sigma
        x_s = x_s + derivative * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x_s = x_s + randn_like_state(x_s, generator) * (s_noise * sigma_up)
        x = x_s / math.sqrt(1 + sigma_next**2)
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=pred.x0))
    return x


__all__ = ["ancestral_step", "sample"]
