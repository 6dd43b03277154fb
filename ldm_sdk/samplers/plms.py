"""PLMS: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds" (ICLR 2022),
the pseudo linear multistep method as CompVis ``PLMSSampler`` implements it.

Each step is a DDIM (eta 0) transfer ``t -> t_next`` driven by a combined noise estimate ``e'``:

- first step: pseudo improved Euler -- a DDIM step with ``e_t`` gives ``x_next``, a second model call at
  ``(x_next, t_next)`` gives ``e_next``, and ``e' = (e_t + e_next) / 2``;
- then Adams--Bashforth of order 2, 3, 4 over the stored ``e_t`` (not ``e'``) of previous steps:
  ``(3 e - e1) / 2``, ``(23 e - 16 e1 + 5 e2) / 12``, ``(55 e - 59 e1 + 37 e2 - 9 e3) / 24``.

The DDIM transfer is written through the prediction: ``x0' = x0 + sqrt((1 - a) / a) (eps - e')`` equals
CompVis's ``(x - sqrt(1 - a) e') / sqrt(a)`` because ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)``. Alphas are
those of DDIM, so the last step goes to ``ab(0)``. diffusers ``PNDMScheduler(skip_prk_steps=True)`` makes the
same model calls as ``n + 1`` scheduler steps with a repeated timestep.

For "v" models the combined quantity is still the noise estimate, each converted at its own ``(x_t, t)``.
(CompVis PLMS has no v support and would treat v as eps; diffusers' PNDM combines raw v outputs and
converts the combination at the current sample, a different method.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser
from ldm_sdk.diffusion.noise import RandomSource
from ldm_sdk.samplers.base import StepCallback, StepInfo, alpha_bars, check_timesteps, start_state, time_batch


def _combine(e_t: Tensor, old: list[Tensor]) -> Tensor:
    if len(old) == 1:
        return (3 * e_t - old[-1]) / 2
    if len(old) == 2:
        return (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def _transfer(x0: Tensor, e_t: Tensor, e_prime: Tensor, a: float, a_prev: float) -> tuple[Tensor, Tensor]:
    """The DDIM (eta 0) step to ``a_prev`` with noise estimate ``e_prime``; returns (x_prev, x0')."""
    x0_prime = x0 if e_prime is e_t else x0 + math.sqrt((1 - a) / a) * (e_t - e_prime)
    return math.sqrt(a_prev) * x0_prime + math.sqrt(1 - a_prev) * e_prime, x0_prime


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    callback: StepCallback | None = None,
    generator: RandomSource | None = None,
) -> Tensor:
    """PLMS sampling from ``x`` at ``timesteps[0]`` down the descending ``timesteps`` (deterministic;
    ``generator`` is accepted for a uniform signature and unused). ``n`` steps make ``n + 1`` model calls."""
    del generator
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    ab = alpha_bars(schedule, ts)
    ab_final = alpha_bars(schedule, torch.zeros(1, dtype=torch.float64))[0]
    x = start_state(x)
    total = len(ab)
    old_eps: list[Tensor] = []
    for i in range(total):
        a = ab[i]
        a_prev = ab[i + 1] if i + 1 < total else ab_final
        t_next = float(ts[min(i + 1, total - 1)])  # CompVis: the last step's "next" is itself
        pred = denoiser(x, time_batch(float(ts[i]), x))
        e_t, x0 = pred.eps.to(x.dtype), pred.x0.to(x.dtype)
        if not old_eps:
            x_next, _ = _transfer(x0, e_t, e_t, a, a_prev)
            e_next = denoiser(x_next, time_batch(t_next, x)).eps.to(x.dtype)
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = _combine(e_t, old_eps)
        x, x0_prime = _transfer(x0, e_t, e_prime, a, a_prev)
        old_eps.append(e_t)
        if len(old_eps) > 3:
            old_eps.pop(0)
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=x0_prime))
    return x


__all__ = ["sample"]
