"""Ancestral DDPM sampling: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (NeurIPS 2020),
Algorithm 2, written as CompVis ``DDPM.p_sample`` does it: sample the posterior ``q(x_{t-1} | x_t, x0)``
at the predicted ``x0``::

    mean   = posterior_mean_coef1[t] x0 + posterior_mean_coef2[t] x_t
    x_{t-1} = mean + exp(0.5 posterior_log_variance_clipped[t]) z      (no noise at t == 0)

The coefficients are the schedule's float32 CompVis buffers, so the timesteps must be consecutive integers
(the full chain ``T-1, ..., 0`` or a tail of it). For strided schedules use DDIM with ``eta=1``. CompVis
clips ``x0`` to [-1, 1] here by default (``clip_denoised``): build the denoiser with ``clip_x0=True``
for that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser
from ldm_sdk.diffusion.noise import RandomSource
from ldm_sdk.samplers.base import (
    StepCallback,
    StepInfo,
    check_timesteps,
    randn_like_state,
    start_state,
    time_batch,
)


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    callback: StepCallback | None = None,
    generator: RandomSource | None = None,
) -> Tensor:
    """Ancestral sampling from ``x`` at ``timesteps[0]`` over consecutive integer ``timesteps``
    (e.g. ``torch.arange(T - 1, -1, -1)``); one ``randn`` from ``generator`` per step with ``t > 0``."""
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    if not torch.equal(ts, ts.round()) or torch.any(ts[:-1] - ts[1:] != 1):
        raise ValueError(
            "DDPM ancestral sampling needs consecutive integer timesteps such as "
            "torch.arange(T - 1, -1, -1); "
            f"got {ts.tolist()}. For strided timesteps use the DDIM sampler with eta=1."
        )
    coef1 = schedule.posterior_mean_coef1.cpu().tolist()
    coef2 = schedule.posterior_mean_coef2.cpu().tolist()
    log_var = schedule.posterior_log_variance_clipped.cpu().tolist()
    x = start_state(x)
    total = ts.numel()
    for i in range(total):
        t = int(ts[i])
        pred = denoiser(x, time_batch(float(t), x))
        x = coef1[t] * pred.x0.to(x.dtype) + coef2[t] * x
        if t > 0:
            x = x + math.exp(0.5 * log_var[t]) * randn_like_state(x, generator)
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=pred.x0))
    return x


__all__ = ["sample"]
