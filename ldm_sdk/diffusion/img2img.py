"""Image-to-image (SDEdit, Meng et al. 2022) the CompVis way: noise the init latent, denoise a tail of steps.

CompVis ``scripts/img2img.py`` with ``strength`` and ``ddim_steps`` does::

    t_enc = int(strength * ddim_steps)
    z_enc = sampler.stochastic_encode(init_latent, [t_enc])   # q_sample at ddim_timesteps[t_enc]
    samples = sampler.decode(z_enc, c, t_enc)                 # denoise over ddim_timesteps[:t_enc], reversed

Note the CompVis off-by-one kept here: the latent is noised to the DDIM timestep one above the first one
denoised (``ddim_timesteps[t_enc]`` vs ``ddim_timesteps[t_enc - 1]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_sdk.diffusion.denoiser import alpha_bar_like, work_dtype
from ldm_sdk.diffusion.schedule import DiffusionSchedule


def stochastic_encode(schedule: DiffusionSchedule, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
    """``sqrt(ab(t)) x0 + sqrt(1 - ab(t)) noise`` (CompVis ``DDIMSampler.stochastic_encode``).

    ``t`` is the timestep itself (a scalar or ``(B,)``, fractional allowed), not CompVis's index into the
    DDIM table; pass the first element of :func:`img2img_start`'s result.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
    ab = alpha_bar_like(schedule, torch.as_tensor(t), x0)
    dtype = work_dtype(x0)
    return ab.sqrt() * x0.to(dtype) + (1.0 - ab).sqrt() * noise.to(dtype)


def img2img_start(timesteps: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """The timestep to encode at and the descending timesteps to denoise, for ``strength`` in [0, 1].

    ``timesteps`` is a full descending sampling sequence of ``n`` steps (e.g. ``ddim_timesteps(n)``).
    With ``t_enc = int(strength * n)`` this returns ``(ascending[t_enc], ascending[:t_enc] reversed)`` like
    CompVis.
    ``strength == 0`` gives no steps. Deviation: where ``t_enc == n`` (strength 1) CompVis indexes past the
    end of its table and fails; here the latent is encoded at the top timestep and all ``n`` steps run.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    if torch.any(timesteps[1:] > timesteps[:-1]):
        raise ValueError("timesteps must be in descending order (as used for sampling)")
    n = timesteps.numel()
    t_enc = int(strength * n)
    ascending = timesteps.flip(0)
    if t_enc >= n:
        return ascending[-1].clone(), timesteps.clone()
    return ascending[t_enc].clone(), ascending[:t_enc].flip(0)


__all__ = ["img2img_start", "stochastic_encode"]
