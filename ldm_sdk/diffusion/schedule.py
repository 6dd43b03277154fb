"""Noise schedules exactly as CompVis ``make_beta_schedule`` / ``DDPM.register_schedule`` compute them.

The buffers are computed in float64 and stored in float32, as the original does, so the tables inside a
CompVis checkpoint (``betas``, ``alphas_cumprod`` ...) are reproduced bit for bit.

Fractional timesteps (needed by sigma-space samplers such as Euler with Karras sigmas) are served by
interpolating ``log sigma`` linearly between neighbouring integer steps, where
``sigma(t) = sqrt((1 - alpha_bar(t)) / alpha_bar(t))``; at integer ``t`` the table value is returned exactly.

The lookups run on :class:`ScheduleTables`, float64 copies of the tables they read, made once per device
(:meth:`DiffusionSchedule.tables`). The public methods validate the range and compute on the schedule's own
device; a denoiser looks up on its input's device instead, with no host synchronisation
(:func:`~ldm_sdk.diffusion.denoiser.signal_noise_scales`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldm_sdk.models.configs import BetaSchedule, DiffusionConfig

# Names and order of the schedule buffers in a CompVis DDPM/LatentDiffusion state dict.
SCHEDULE_BUFFERS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def make_beta_schedule(
    schedule: BetaSchedule,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas (float64) as CompVis ``make_beta_schedule`` gives them; its "linear" is linear in sqrt(beta)."""
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got {n_timestep}")
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        timesteps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = timesteps / (1 + cosine_s) * math.pi / 2
        alphas = torch.cos(alphas).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        betas = torch.clamp(betas, min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; valid: linear, cosine, sqrt_linear, sqrt")
    return betas.numpy()


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class ScheduleTables:
    """The float64 tables the timestep lookups read, on one device, and the lookups themselves.

    The lookups take float64 timesteps on the tables' device and neither validate them nor read them on the
    host, so on an accelerator they queue kernels without waiting for the device. Timesteps outside
    ``[0, T-1]`` are clamped into the table (callers validate: :meth:`DiffusionSchedule.alpha_bar` and the
    samplers' ``check_timesteps`` do, on the host); inside it the results are exactly those of the checked
    methods.
    """

    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_sigmas: Tensor

    @property
    def device(self) -> torch.device:
        return self.log_sigmas.device

    def _last(self) -> int:
        return int(self.log_sigmas.shape[0]) - 1

    def sigma(self, t: Tensor) -> Tensor:
        """``sigma`` at float64 timesteps ``t``: ``log sigma`` interpolated between integer steps."""
        low = t.floor().long().clamp(0, self._last())
        high = torch.clamp(low + 1, max=self._last())
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp()

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar at float64 timesteps ``t``: the table value at integer ``t``, else interpolated."""
        integral = t == t.round()
        exact = self.alphas_cumprod[t.round().long().clamp(0, self._last())]
        interp = 1.0 / (1.0 + self.sigma(t).pow(2))
        return torch.where(integral, exact, interp)

    def signal_noise_scales(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(ab(t)), sqrt(1 - ab(t)))`` at float64 timesteps ``t``: the ``sqrt_alphas_cumprod`` /
        ``sqrt_one_minus_alphas_cumprod`` table values at integer ``t``, else from the interpolated ab."""
        ab = self.alpha_bar(t)
        index = t.round().long().clamp(0, self._last())
        integral = t == t.round()
        sqrt_ab = torch.where(integral, self.sqrt_alphas_cumprod[index], ab.sqrt())
        sqrt_1m = torch.where(integral, self.sqrt_one_minus_alphas_cumprod[index], (1.0 - ab).sqrt())
        return sqrt_ab, sqrt_1m


class DiffusionSchedule(nn.Module):
    """The discrete forward process: CompVis schedule buffers plus lookups at (fractional) timesteps."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    def __init__(self, betas: np.ndarray | Tensor, v_posterior: float = 0.0) -> None:
        super().__init__()
        betas = np.asarray(betas.detach().cpu().double() if isinstance(betas, Tensor) else betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with every value in (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.v_posterior = v_posterior
        posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + v_posterior * betas
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32))
        # float64 log-sigma table for interpolation at fractional timesteps (not part of the state dict)
        self.register_buffer(
            "_log_sigmas", torch.tensor(0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)), persistent=False
        )
        self._tables: dict[torch.device, ScheduleTables] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> DiffusionSchedule:
        betas = make_beta_schedule(
            config.beta_schedule, config.timesteps, config.linear_start, config.linear_end, config.cosine_s
        )
        return cls(betas, v_posterior=config.v_posterior)

    # -- lookups -------------------------------------------------------------------------------------
    def tables(self, device: torch.device | str | None = None) -> ScheduleTables:
        """The float64 lookup tables on ``device`` (default: the schedule's own), made on first use and
        kept until the schedule's buffers are moved, cast or loaded (``.to()``, ``load_state_dict``). They
        are copies: change the schedule through those, not by writing into its buffers."""
        device = self._log_sigmas.device if device is None else torch.device(device)
        tables = self._tables.get(device)
        if tables is None:
            tables = ScheduleTables(
                alphas_cumprod=self.alphas_cumprod.to(device, torch.float64),
                sqrt_alphas_cumprod=self.sqrt_alphas_cumprod.to(device, torch.float64),
                sqrt_one_minus_alphas_cumprod=self.sqrt_one_minus_alphas_cumprod.to(device, torch.float64),
                log_sigmas=self._log_sigmas.to(device, torch.float64),
            )
            self._tables[device] = tables
        return tables

    def _checked(self, t: Tensor) -> Tensor:
        """``t`` as float64 on the schedule's device; ``ValueError`` unless every value lies in [0, T-1]
        (this reads ``t`` on the host)."""
        t = t.to(self._log_sigmas.device, torch.float64)
        if torch.any((t < 0) | (t > self.num_timesteps - 1)):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.tolist()}")
        return t

    def sigma(self, t: Tensor) -> Tensor:
        """``sqrt((1 - alpha_bar) / alpha_bar)`` (float64) at (fractional) timesteps ``t``."""
        return self.tables().sigma(self._checked(t))

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar (float64) at timesteps ``t``: the table value at integer ``t``, else interpolated."""
        return self.tables().alpha_bar(self._checked(t))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma`: the fractional timestep whose interpolated sigma is ``sigma``."""
        log_sigma = sigma.to(self._log_sigmas.device, torch.float64).clamp_min(1e-10).log()
        table = self._log_sigmas
        idx = torch.searchsorted(table, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low, high = table[idx - 1], table[idx]
        w = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return (idx - 1).double() + w

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Forward process ``sqrt(ab) x0 + sqrt(1 - ab) noise`` at integer timesteps ``t`` (shape [B])."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    # the lookup tables are copies of the buffers: dropped when the buffers are moved, cast or loaded
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DiffusionSchedule:
        self._tables = {}
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._tables = {}
        super()._load_from_state_dict(*args, **kwargs)


def _extract(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    out = table.to(like.device)[t.to(like.device).long()]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
