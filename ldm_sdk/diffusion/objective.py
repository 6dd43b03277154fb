"""The training objective of CompVis ``LatentDiffusion.p_losses`` (Ho et al. 2020; Rombach et al. 2022).

For clean latents ``x0``, timesteps ``t`` and noise ``eps``::

    x_t         = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps                       (q_sample)
    target      = eps | x0 | sqrt(ab_t) eps - sqrt(1 - ab_t) x0            (eps / x0 / v parameterization)
    loss_simple = mean over non-batch dims of |out - target| or (out - target)^2       (per sample)
    loss        = l_simple_weight * mean(loss_simple / exp(logvar[t]) + logvar[t])
                  + original_elbo_weight * mean(lvlb_weights[t] * loss_simple)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelFn
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig, Parameterization


def _extract(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    return (
        table.to(like.device)[t.to(like.device).long()].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    )


def lvlb_weights(schedule: DiffusionSchedule, parameterization: Parameterization) -> Tensor:
    """Per-timestep weights of the variational bound term, as CompVis ``DDPM.register_schedule`` (float32).

    eps: ``betas^2 / (2 posterior_variance alphas (1 - ab))``; x0: ``0.5 sqrt(ab) / (2. * 1 - ab)`` -- the
    original's operator precedence makes that ``2 - ab``, not the ``2 (1 - ab)`` it presumably meant, and it
    is kept so losses match; v: ones. Entry 0 (infinite for eps) is set to entry 1 in every case.
    """
    betas = schedule.betas
    alphas = (1.0 - schedule.betas.double()).float()
    if parameterization == "eps":
        weights = betas**2 / (2 * schedule.posterior_variance * alphas * (1 - schedule.alphas_cumprod))
    elif parameterization == "x0":
        weights = 0.5 * schedule.alphas_cumprod.sqrt() / (2.0 * 1 - schedule.alphas_cumprod)
    elif parameterization == "v":
        weights = torch.ones_like(betas)
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}; valid: eps, x0, v")
    weights = weights.clone()
    weights[0] = weights[1]
    return weights


def training_target(
    schedule: DiffusionSchedule, parameterization: Parameterization, x0: Tensor, noise: Tensor, t: Tensor
) -> Tensor:
    """What the network is trained to output at ``q_sample(x0, t, noise)`` (integer ``t``)."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":  # CompVis get_v
        return (
            _extract(schedule.sqrt_alphas_cumprod, t, x0) * noise
            - _extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )
    raise ValueError(f"unknown parameterization {parameterization!r}; valid: eps, x0, v")


def _per_sample(diff: Tensor, loss_type: str) -> Tensor:
    if loss_type == "l2":
        values = diff.pow(2)
    elif loss_type == "l1":
        values = diff.abs()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: l1, l2")
    return values.mean(dim=tuple(range(1, diff.ndim)))


def diffusion_loss(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    x0: Tensor,
    cond: Conditioning,
    t: Tensor,
    noise: Tensor,
    config: DiffusionConfig,
    logvar: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss and its log values ("loss_simple", "loss_vlb", "loss"; with ``learn_logvar`` also
    "loss_gamma" and "logvar"), like CompVis ``p_losses`` (the caller adds its "train/" or "val/" prefix).

    ``t``: integer timesteps ``(B,)``, handed to ``model_fn`` unchanged as CompVis does; ``noise``: x0's
    shape; ``logvar``: the ``(T,)`` per-timestep log-variance (a parameter when learned), default
    ``config.logvar_init`` everywhere.
    """
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("training timesteps must be integers in [0, T-1]")
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
    num_timesteps = schedule.num_timesteps
    if logvar is None:
        logvar = torch.full((num_timesteps,), config.logvar_init)
    if logvar.shape != (num_timesteps,):
        raise ValueError(f"logvar must have shape ({num_timesteps},), got {tuple(logvar.shape)}")

    x_noisy = schedule.q_sample(x0, t, noise)
    out = model_fn(x_noisy, t, cond)
    target = training_target(schedule, config.parameterization, x0, noise, t)
    if out.shape != target.shape:
        raise ValueError(f"model output {tuple(out.shape)} must match the target {tuple(target.shape)}")

    loss_simple = _per_sample(out - target, config.loss_type)
    logs: dict[str, Tensor] = {"loss_simple": loss_simple.mean()}
    logvar_t = logvar.to(x0.device)[t.to(x0.device).long()]
    loss = loss_simple / torch.exp(logvar_t) + logvar_t
    if config.learn_logvar:
        logs["loss_gamma"] = loss.mean()
        logs["logvar"] = logvar.detach().mean()
    loss = config.l_simple_weight * loss.mean()

    weights = lvlb_weights(schedule, config.parameterization).to(x0.device)[t.to(x0.device).long()]
    loss_vlb = (weights * loss_simple).mean()
    logs["loss_vlb"] = loss_vlb
    loss = loss + config.original_elbo_weight * loss_vlb
    logs["loss"] = loss
    return loss, logs


__all__ = ["diffusion_loss", "lvlb_weights", "training_target"]
