"""Small building blocks shared by the UNet and its attention layers.

Names and numerics follow ``ldm.modules.diffusionmodules.util`` of CompVis: ``timestep_embedding``,
``GroupNorm32`` / ``normalization``, ``zero_module`` and a gradient-checkpoint helper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = ["GroupNorm32", "checkpoint", "normalization", "timestep_embedding", "zero_module"]

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in CompVis / ADM.

    ``timesteps`` is a 1-D tensor of ``N`` values. Returns ``(N, dim)`` float32: ``cos`` of the ``dim // 2``
    frequencies ``max_period ** (-i / (dim // 2))`` first, then ``sin``; an odd ``dim`` gets a trailing zero
    column. With ``repeat_only`` every row is the timestep repeated ``dim`` times (no sinusoids).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of shape (N,), got shape {tuple(timesteps.shape)}")
    if repeat_only:
        return timesteps[:, None].expand(timesteps.shape[0], dim).clone()
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and casts the result back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's standard normalisation: 32 groups, eps 1e-5, in float32."""
    if channels % 32:
        raise ValueError(f"normalization uses 32 groups: channels must be a multiple of 32, got {channels}")
    return GroupNorm32(32, channels)


def zero_module(module: M) -> M:
    """Zero every parameter of ``module`` in place and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def checkpoint(function: Callable[..., T], *args: torch.Tensor | None, enabled: bool) -> T:
    """Run ``function(*args)``, recomputing its activations in backward when ``enabled``.

    A no-op (plain call) when ``enabled`` is false or gradients are off; callers pass
    ``enabled=self.use_checkpoint and self.training``. Uses non-reentrant ``torch.utils.checkpoint``,
    so parameters inside ``function`` get gradients without being listed and RNG state (dropout) is replayed.
    """
    if not enabled or not torch.is_grad_enabled():
        return function(*args)
    return _torch_checkpoint(function, *args, use_reentrant=False)  # type: ignore[return-value]
