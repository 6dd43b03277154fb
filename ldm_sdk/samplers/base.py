"""What every sampler shares: the callback payload, cancellation, timestep sequences and small helpers.

A sampler is a plain function ``sample(denoiser, x, timesteps, *, callback=None, generator=None, ...)``.
``x`` is the VP-space state at ``timesteps[0]`` (pure noise ``N(0, I)`` when starting from the top),
``timesteps`` a descending float tensor of (possibly fractional) timesteps in [0, T-1]. After each step
the sampler calls ``callback(StepInfo(...))``. To cancel a run, raise :class:`SamplingCancelled` from the
callback: the sampler does not catch it, so it reaches the caller of ``sample`` and no further model call
is made. Random numbers come only from ``generator`` (one ``randn`` of ``x``'s shape per noisy step), drawn
through :func:`randn_like_state`: ``generator`` may then also be an
:class:`~ldm_sdk.diffusion.noise.ItemGenerators`, one generator per batch item.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import work_dtype
from ldm_sdk.diffusion.noise import RandomSource, randn
from ldm_sdk.diffusion.schedule import DiffusionSchedule


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class StepInfo:
    """Progress after one sampler step: ``step`` (0-based) of ``total``, the timestep ``t`` the step
    started from (0-d), the new state ``x`` (VP space) and the denoiser's ``x0`` estimate at that step."""

    step: int
    total: int
    t: Tensor
    x: Tensor
    x0: Tensor


StepCallback = Callable[[StepInfo], None]


class SamplingCancelled(Exception):
    """Raise from a step callback to stop sampling; it propagates out of ``sample`` unchanged."""


# -- timestep sequences (all returned descending, float64, on the CPU) --------------------------------------
def ddim_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, method: Literal["uniform", "quad"] = "uniform"
) -> Tensor:
    """CompVis ``make_ddim_timesteps`` (including its ``+1`` offset), descending.

    uniform: ``range(0, T, T // n) + 1`` -- note this yields more than ``n`` steps when ``T % n`` is large
    (e.g. ``T=1000, n=7`` gives 8), exactly as CompVis; quad: ``int(linspace(0, sqrt(0.8 T), n) ** 2) + 1``
    (may repeat small timesteps for large ``n``, as CompVis; a repeated step is a no-op DDIM step).
    A step the ``+1`` pushes to ``T`` (uniform, e.g. ``n = 9``: ``1, 112, ..., 1000``) is dropped, where
    CompVis would fail indexing its table.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_train_timesteps}], got {num_steps}")
    if method == "uniform":
        steps = np.arange(0, num_train_timesteps, num_train_timesteps // num_steps)
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization {method!r}; valid: uniform, quad")
    steps = steps + 1
    # Deviation: where the +1 reaches T (uniform with (T-1) % (T // n) == 0, e.g. n = 3, 9, 27 for T = 1000)
    # CompVis indexes past its alpha table and fails; that step is dropped here.
    steps = steps[steps <= num_train_timesteps - 1]
    return torch.from_numpy(steps[::-1].astype(np.float64).copy())


def linspace_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, *, include_zero: bool = True
) -> Tensor:
    """diffusers' "linspace" spacing, descending.

    ``include_zero=True`` (Euler, Euler ancestral, Heun, LMS): ``n`` float32 points from ``T-1`` to ``0``,
    fractional in general. ``include_zero=False`` (DPMSolverMultistep, UniPC, DEIS):
    ``round(linspace(0, T-1, n+1))`` reversed without its final 0, integers.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if include_zero:
        steps = np.linspace(0, num_train_timesteps - 1, num_steps, dtype=np.float32)[::-1]
    else:
        steps = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return torch.from_numpy(steps.astype(np.float64).copy())


def karras_timesteps(schedule: DiffusionSchedule, num_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (EDM) sigmas between the table's ``sigma(0)`` and ``sigma(T-1)``, as fractional
    timesteps: ``sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` mapped through
    ``schedule.sigma_to_t`` (diffusers ``_convert_to_karras`` + ``_sigma_to_t``; timesteps not rounded)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ends = schedule.sigma(torch.tensor([0.0, schedule.num_timesteps - 1.0], dtype=torch.float64)).cpu()
    sigma_min, sigma_max = float(ends[0]), float(ends[1])
    ramp = torch.from_numpy(np.linspace(0, 1, num_steps))
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return schedule.sigma_to_t(sigmas).cpu()


# -- helpers for sampler implementations ----------------------------------------------------------------
def check_timesteps(timesteps: Tensor, schedule: DiffusionSchedule) -> Tensor:
    """Validate a sampling sequence; return it as a float64 CPU tensor."""
    ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
    if ts.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(ts.shape)}")
    if torch.any(ts[1:] > ts[:-1]):
        raise ValueError(f"timesteps must be descending, got {ts.tolist()}")
    if torch.any((ts < 0) | (ts > schedule.num_timesteps - 1)):
        raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {ts.tolist()}")
    return ts


def alpha_bars(schedule: DiffusionSchedule, ts: Tensor) -> list[float]:
    """``alpha_bar`` at each timestep, float64 values as Python floats."""
    return schedule.alpha_bar(ts).cpu().tolist() if ts.numel() else []


def time_batch(t: float, x: Tensor) -> Tensor:
    """The timestep as a ``(B,)`` tensor on ``x``'s device (float64; float32 where float64 is missing)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def start_state(x: Tensor) -> Tensor:
    """The sampler's working copy of ``x`` (at least float32)."""
    return x.to(work_dtype(x))


def randn_like_state(x: Tensor, generator: RandomSource | None) -> Tensor:
    """``randn`` of ``x``'s shape and dtype drawn on the generator's device, then moved to ``x``'s; with
    :class:`~ldm_sdk.diffusion.noise.ItemGenerators` each batch item from its own generator."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


__all__ = [
    "SamplingCancelled",
    "StepCallback",
    "StepInfo",
    "alpha_bars",
    "check_timesteps",
    "ddim_timesteps",
    "karras_timesteps",
    "linspace_timesteps",
    "randn_like_state",
    "start_state",
    "time_batch",
]
