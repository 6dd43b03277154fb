"""Denoisers: a network's raw output turned into both parameterizations a sampler needs.

Everything lives in "VP space": ``x_t = sqrt(ab(t)) x0 + sqrt(1 - ab(t)) eps`` with ``ab = alpha_bar`` of the
:class:`~ldm_sdk.diffusion.schedule.DiffusionSchedule` at a (possibly fractional) timestep ``t``. A
:class:`Denoiser` maps ``(x_t, t)`` to a :class:`Prediction` holding the noise estimate ``eps`` and the clean
estimate ``x0``; samplers only ever see that. :class:`ModelDenoiser` builds one from a raw network
(``ModelFn``) trained with the "eps", "x0" or "v" parameterization, with the formulas of CompVis
``DDPM.predict_start_from_noise``, ``_predict_eps_from_xstart``, ``predict_start_from_z_and_v`` and
``predict_eps_from_z_and_v`` (the latter two from Salimans & Ho 2022, progressive distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, get_args

import torch
from torch import Tensor

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import Parameterization

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""Raw network output for ``(x, t, cond)``: ``x`` (B, C, H, W), ``t`` float timesteps (B,)."""


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class Prediction:
    """The denoiser's estimates at ``(x_t, t)``: the noise ``eps`` and the clean sample ``x0``."""

    eps: Tensor
    x0: Tensor


class Denoiser(Protocol):
    """Anything a sampler can call: ``denoiser(x, t) -> Prediction`` plus the schedule it lives on."""

    schedule: DiffusionSchedule

    def __call__(self, x: Tensor, t: Tensor) -> Prediction: ...


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype diffusion arithmetic runs in: x's dtype, but at least float32 (CompVis buffers are fp32)."""
    return torch.promote_types(x.dtype, torch.float32)


def batch_time(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as a 1-D tensor of ``like``'s batch size (a scalar or 0-d tensor is repeated)."""
    t = torch.as_tensor(t)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t


def alpha_bar_like(schedule: DiffusionSchedule, t: Tensor, like: Tensor) -> Tensor:
    """``alpha_bar(t)`` (float64 math) as a ``(B, 1, ..., 1)`` tensor in ``like``'s work dtype and device."""
    ab = schedule.alpha_bar(batch_time(t, like))
    return ab.to(work_dtype(like)).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def lookup_device(t: Tensor) -> torch.device:
    """Where the coefficients for timesteps ``t`` are looked up: ``t``'s own device when it computes in
    float64 (CPU, CUDA), so that a step never copies ``t`` to the host (which would wait for the GPU);
    else (MPS) the CPU."""
    return t.device if t.device.type != "mps" else torch.device("cpu")


def signal_noise_scales(schedule: DiffusionSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(sqrt(ab(t)), sqrt(1 - ab(t)))`` in float64 for timesteps ``t`` of shape (B,), on
    :func:`lookup_device` of ``t``.

    At integer ``t`` these are CompVis's ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod`` buffers
    (computed from float64 alpha_bar, so ``1 - ab`` keeps its precision near t = 0, where deriving it from
    the float32 ``alphas_cumprod`` would cost ~1e-5 relative); elsewhere the interpolated alpha_bar's.

    The look-up reads the schedule's float64 tables on ``t``'s device (:meth:`DiffusionSchedule.tables`,
    copied there once), so on a GPU it only queues kernels: no device-to-host copy, no wait for the model
    call before it. Timesteps on the CPU are checked to lie in [0, T-1] (``ValueError``); on an accelerator
    that check would read them on the host, so it is left to the samplers, which validate their timesteps
    on the CPU before sampling (values outside are clamped into the table).
    """
    device = lookup_device(t)
    t64 = t.to(device, torch.float64)
    if device.type == "cpu":
        last = schedule.num_timesteps - 1
        if torch.any((t64 < 0) | (t64 > last)):
            raise ValueError(f"timesteps must lie in [0, {last}], got {t64.tolist()}")
    return schedule.tables(device).signal_noise_scales(t64)


def prediction_from_output(
    schedule: DiffusionSchedule, parameterization: Parameterization, x: Tensor, t: Tensor, out: Tensor
) -> Prediction:
    """Convert a raw network output into ``(eps, x0)`` at ``(x, t)`` for the given parameterization."""
    sqrt_ab64, sqrt_1m64 = signal_noise_scales(schedule, batch_time(t, x))
    dtype = work_dtype(x)

    def coef(values: Tensor) -> Tensor:  # float64 math, then the work dtype, shaped to broadcast over x
        # already on x's device when t is (samplers: time_batch), so nothing is copied
        return values.to(dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))

    x = x.to(dtype)
    out = out.to(dtype)
    if parameterization == "eps":  # predict_start_from_noise
        x0 = coef(1.0 / sqrt_ab64) * x - coef(sqrt_1m64 / sqrt_ab64) * out
        return Prediction(eps=out, x0=x0)
    if parameterization == "x0":  # _predict_eps_from_xstart
        eps = (coef(1.0 / sqrt_ab64) * x - out) / coef(sqrt_1m64 / sqrt_ab64)
        return Prediction(eps=eps, x0=out)
    if parameterization == "v":  # predict_eps_from_z_and_v / predict_start_from_z_and_v
        sqrt_ab, sqrt_1m = coef(sqrt_ab64), coef(sqrt_1m64)
        return Prediction(eps=sqrt_ab * out + sqrt_1m * x, x0=sqrt_ab * x - sqrt_1m * out)
    raise ValueError(f"unknown parameterization {parameterization!r}; valid: eps, x0, v")


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class ModelDenoiser:
    """A :class:`Denoiser` over a raw network ``model_fn`` with a fixed conditioning.

    ``clip_x0`` clamps the ``x0`` estimate to [-1, 1] (CompVis ``clip_denoised`` in ``p_mean_variance``,
    which its DDPM loop uses); ``eps`` stays the network's, as in CompVis. Off by default; meant for DDPM.
    """

    model_fn: ModelFn
    schedule: DiffusionSchedule
    parameterization: Parameterization = "eps"
    cond: Conditioning = field(default_factory=Conditioning)
    clip_x0: bool = False

    def __post_init__(self) -> None:
        if self.parameterization not in get_args(Parameterization):
            raise ValueError(
                f"unknown parameterization {self.parameterization!r}; "
                f"valid: {', '.join(get_args(Parameterization))}"
            )

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        t = batch_time(t, x)
        out = self.model_fn(x, t, self.cond)
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; an "
                f"{self.parameterization!r} model must return x's shape (learned variance is unsupported)"
            )
        pred = prediction_from_output(self.schedule, self.parameterization, x, t, out)
        if self.clip_x0:
            pred = Prediction(eps=pred.eps, x0=pred.x0.clamp(-1.0, 1.0))
        return pred


__all__ = [
    "Denoiser",
    "ModelDenoiser",
    "ModelFn",
    "Prediction",
    "alpha_bar_like",
    "batch_time",
    "lookup_device",
    "prediction_from_output",
    "signal_noise_scales",
    "work_dtype",
]
