"""Heun's 2nd-order method: Karras, Aittala, Aila & Laine, "Elucidating the Design Space of Diffusion-Based
Generative Models" (NeurIPS 2022), Algorithm 2 with ``S_churn = 0``, i.e. the deterministic sampler (the
same as k-diffusion ``sample_heun`` with its defaults and diffusers ``HeunDiscreteScheduler``).

It runs in sigma ("VE") space, ``x_s = x_vp sqrt(1 + sigma^2)`` with ``sigma = sqrt((1 - ab) / ab)``; the
denoiser ``D`` is called at the VP state. For ``sigma_i -> sigma_{i+1}``::

    d_i      = (x_i - D(x_i; sigma_i)) / sigma_i                      # Euler step ...
    x_{i+1}  = x_i + (sigma_{i+1} - sigma_i) d_i
    if sigma_{i+1} != 0:                                               # ... corrected by the trapezoidal rule
        d'_i    = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2

The step after the last timestep goes to ``sigma = 0`` with the Euler step alone (``d'`` would divide by
zero), so ``n`` timesteps cost ``2n - 1`` denoiser calls, and the result is in VP and sigma space alike.
No random numbers are drawn: ``generator`` is accepted (every sampler takes it) and unused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser
from ldm_sdk.samplers.base import (
    StepCallback,
    StepInfo,
    alpha_bars,
    check_timesteps,
    start_state,
    time_batch,
)

__all__ = ["sample"]


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    callback: StepCallback | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's 2nd-order ODE sampler (Karras et al. 2022, Algorithm 2 without churn), deterministic.

    ``x``: the VP state at ``timesteps[0]``; ``timesteps``: descending (fractional allowed), e.g.
    ``ldm_sdk.samplers.base.linspace_timesteps(n)`` or ``karras_timesteps(schedule, n)``. Calls the denoiser
    ``2 len(timesteps) - 1`` times and ``callback(StepInfo)`` once per timestep (``x0``: the estimate at
    the step's start). Returns the VP-space (= sigma-space) result at ``sigma = 0``.
    """
    del generator  # deterministic: no noise is drawn
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    sigmas = [math.sqrt((1 - a) / a) for a in alpha_bars(schedule, ts)] + [0.0]
    x = start_state(x)
    x_s = x * math.sqrt(1 + sigmas[0] ** 2) if sigmas[:-1] else x
    total = ts.numel()
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = denoiser(x_s / math.sqrt(1 + sigma**2), time_batch(float(ts[i]), x_s))
        d = (x_s - pred.x0.to(x_s.dtype)) / sigma
        x_euler = x_s + d * (sigma_next - sigma)
        if sigma_next == 0:
            x_s = x_euler
        else:
            scale_next = math.sqrt(1 + sigma_next**2)
            pred_next = denoiser(x_euler / scale_next, time_batch(float(ts[i + 1]), x_s))
            d_next = (x_euler - pred_next.x0.to(x_s.dtype)) / sigma_next
            x_s = x_s + (d + d_next) * ((sigma_next - sigma) / 2)
        x = x_s / math.sqrt(1 + sigma_next**2)
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=pred.x0))
    return x
