"""DPM-Solver++(2M): Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (2022), Algorithm 2 (multistep second order, data prediction).

In VP space with ``alpha = sqrt(ab)``, ``sigma = sqrt(1 - ab)`` and ``lambda = log(alpha / sigma)``, a step
``s -> t`` with ``h = lambda_t - lambda_s`` and the previous step's ``h_last`` (``r = h_last / h``) is::

    D      = x0_s + (x0_s - x0_prev) / (2 r)                 (first step: D = x0_s)
    x_t    = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D

The step after the last timestep goes to ``sigma = 0`` and is first order, so it returns the last ``x0``
estimate (diffusers ``final_sigmas_type="zero"``, k-diffusion ``sample_dpmpp_2m``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser
from ldm_sdk.diffusion.noise import RandomSource
from ldm_sdk.samplers.base import StepCallback, StepInfo, alpha_bars, check_timesteps, start_state, time_batch


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    callback: StepCallback | None = None,
    generator: RandomSource | None = None,
) -> Tensor:
    """DPM-Solver++(2M) from ``x`` at ``timesteps[0]`` down the strictly descending ``timesteps`` and on
    to ``sigma = 0``; deterministic (``generator`` is accepted for a uniform signature and unused).
    Returns the final ``x0`` estimate (``x``'s dtype, at least float32)."""
    del generator
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    if torch.any(ts[1:] == ts[:-1]):
        raise ValueError(f"DPM-Solver++ needs strictly descending timesteps, got {ts.tolist()}")
    ab = alpha_bars(schedule, ts)
    alphas = [math.sqrt(a) for a in ab]
    sigmas = [math.sqrt(1 - a) for a in ab]
    lambdas = [math.log(al) - math.log(si) for al, si in zip(alphas, sigmas, strict=True)]
    x = start_state(x)
    total = len(ab)
    old_x0: Tensor | None = None
    for i in range(total):
        pred = denoiser(x, time_batch(float(ts[i]), x))
        x0 = pred.x0.to(x.dtype)
        if i == total - 1:  # first-order step to sigma = 0: exactly the x0 estimate
            x = x0
        else:
            h = lambdas[i + 1] - lambdas[i]
            phi = alphas[i + 1] * math.expm1(-h)
            x = (sigmas[i + 1] / sigmas[i]) * x - phi * x0
            if old_x0 is not None:
                r = (lambdas[i] - lambdas[i - 1]) / h
                x = x - (0.5 / r) * phi * (x0 - old_x0)
        old_x0 = x0
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=pred.x0))
    return x


__all__ = ["sample"]
