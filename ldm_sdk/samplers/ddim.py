"""DDIM: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (ICLR 2021), Eq. 12, CompVis semantics.

For consecutive timesteps ``t -> s`` with ``a = ab(t)``, ``a_prev = ab(s)``::

    sigma  = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z

As in CompVis ``make_ddim_sampling_parameters``, the step from the last timestep goes to ``ab(0)`` (the
first table entry), not to 1: the result is the state at ``t = 0``, not the ``x0`` estimate.
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
    alpha_bars,
    check_timesteps,
    randn_like_state,
    start_state,
    time_batch,
)


def ddim_step_coefficients(a: float, a_prev: float, eta: float) -> tuple[float, float, float]:
    """``(sqrt(a_prev), sqrt(1 - a_prev - sigma^2), sigma)`` for one DDIM step."""
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    dir_var = 1 - a_prev - sigma**2
    if dir_var < 0:
        raise ValueError(f"eta={eta} is too large for this step (1 - a_prev - sigma^2 < 0); use eta <= 1")
    return math.sqrt(a_prev), math.sqrt(dir_var), sigma


def sample(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    *,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    generator: RandomSource | None = None,
) -> Tensor:
    """DDIM sampling from ``x`` at ``timesteps[0]`` down the descending ``timesteps``.

    ``eta=0`` is deterministic; ``eta=1`` matches the DDPM posterior variance at the chosen steps. Noise
    (one ``randn`` of ``x``'s shape per step) is drawn from ``generator`` only when ``eta > 0``. The update
    uses only the prediction ``(x0, eps)``, which makes :class:`~ldm_sdk.diffusion.masking.MaskedDenoiser`
    exact. Returns the state at ``ab(0)`` in ``x``'s dtype promoted to at least float32.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = denoiser.schedule
    ts = check_timesteps(timesteps, schedule)
    ab = alpha_bars(schedule, ts)
    ab_final = alpha_bars(schedule, torch.zeros(1, dtype=torch.float64))[0]
    x = start_state(x)
    total = len(ab)
    for i in range(total):
        a_prev = ab[i + 1] if i + 1 < total else ab_final
        c_x0, c_eps, sigma = ddim_step_coefficients(ab[i], a_prev, eta)
        pred = denoiser(x, time_batch(float(ts[i]), x))
        x = c_x0 * pred.x0.to(x.dtype) + c_eps * pred.eps.to(x.dtype)
        if eta > 0:
            x = x + sigma * randn_like_state(x, generator)
        if callback is not None:
            callback(StepInfo(step=i, total=total, t=ts[i], x=x, x0=pred.x0))
    return x


__all__ = ["ddim_step_coefficients", "sample"]
