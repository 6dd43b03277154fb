"""Keeping known latents: inpainting / outpainting with a model that was not trained for it.

CompVis ``DDIMSampler.ddim_sampling`` takes ``mask`` and ``x0``; before every step it replaces the state by
``img = q_sample(x0, t) * mask + (1 - mask) * img`` (``mask == 1`` keeps the known latent, re-noised to the
current timestep with fresh noise) and steps from that. :class:`MaskedDenoiser` does the same replacement
on the input of every denoiser call and returns the prediction computed there, so samplers stay unaware of
masks.

Why this is exact for DDIM (any eta): a DDIM step depends on the state only through the prediction,
``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z``, so stepping from the blended state and
stepping from the unblended one with the blended state's prediction give the same ``x_prev``. Our PLMS is
written in terms of the prediction too and matches CompVis's masked PLMS, except that the extra model call
of its first (pseudo improved Euler) step is blended as well. Samplers whose update also uses ``x`` itself
(DDPM posterior mean, DPM-Solver++, Euler) get the common "replace known region before each model call"
approximation instead. Finish with :func:`blend_known` to paste the clean known latent back.
"""

from __future__ import annotations

from torch import Tensor

from ldm_sdk.diffusion.denoiser import Denoiser, Prediction, batch_time, signal_noise_scales, work_dtype
from ldm_sdk.diffusion.noise import RandomSource, randn
from ldm_sdk.diffusion.schedule import DiffusionSchedule


def _check_broadcast(x: Tensor, x0_known: Tensor, mask: Tensor) -> None:
    shape = _broadcast_shape(tuple(x.shape), tuple(x0_known.shape), tuple(mask.shape))
    if shape is None:
        raise ValueError(
            f"x {tuple(x.shape)}, x0_known {tuple(x0_known.shape)} and mask {tuple(mask.shape)} "
            "do not broadcast"
        )
    if shape != tuple(x.shape):
        raise ValueError(
            f"x0_known {tuple(x0_known.shape)} and mask {tuple(mask.shape)} "
            f"must broadcast to x {tuple(x.shape)}"
        )


def _broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``shapes`` broadcast to (numpy / torch rules), or None where they do not. In plain Python:
    ``torch.broadcast_shapes`` goes through torch's reference implementations, whose first use imports
    sympy (3.4 s of a first inpaint on the H100 machine, ``bench/profile_tasks.py --pyprofile``)."""
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s)) + s) for s in shapes), strict=True):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def blend_known(x: Tensor, x0_known: Tensor, mask: Tensor) -> Tensor:
    """The final composite ``mask * x0_known + (1 - mask) * x`` (``mask == 1`` keeps the known latent)."""
    _check_broadcast(x, x0_known, mask)
    return mask.to(x.dtype) * x0_known.to(x.dtype) + (1.0 - mask.to(x.dtype)) * x


class MaskedDenoiser:
    """Wrap ``inner`` so every call sees the known latent (noised to ``t``) wherever ``mask == 1``.

    ``x0_known`` is the clean known latent and ``mask`` a map in [0, 1], both broadcastable to ``x``
    (e.g. mask ``(B, 1, H, W)``). Each call draws one ``randn`` of ``x``'s shape from ``generator`` (each
    item from its own with :class:`~ldm_sdk.diffusion.noise.ItemGenerators`) for the forward process
    ``q(x_t | x0_known)`` (CompVis ``q_sample`` at the current timestep).
    """

    def __init__(
        self, inner: Denoiser, x0_known: Tensor, mask: Tensor, generator: RandomSource | None = None
    ) -> None:
        if mask.is_floating_point() and (mask.min() < 0 or mask.max() > 1):
            raise ValueError("mask values must lie in [0, 1] (1 keeps the known latent)")
        self.inner = inner
        self.x0_known = x0_known
        self.mask = mask
        self.generator = generator

    @property
    def schedule(self) -> DiffusionSchedule:
        return self.inner.schedule

    def noised_known(self, x: Tensor, t: Tensor) -> Tensor:
        """``sqrt(ab(t)) x0_known + sqrt(1 - ab(t)) z`` (CompVis ``q_sample``) with fresh noise ``z``."""
        noise = randn(x.shape, self.generator, device=x.device, dtype=work_dtype(x))
        shape = (-1, *([1] * (x.ndim - 1)))
        sqrt_ab, sqrt_1m = (
            c.to(noise.dtype).to(x.device).reshape(shape) for c in signal_noise_scales(self.schedule, t)
        )
        return sqrt_ab * self.x0_known.to(x.device, noise.dtype) + sqrt_1m * noise.to(x.device)

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        _check_broadcast(x, self.x0_known, self.mask)
        t = batch_time(t, x)
        mask = self.mask.to(x.device, work_dtype(x))
        x_in = mask * self.noised_known(x, t) + (1.0 - mask) * x.to(mask.dtype)
        return self.inner(x_in, t)


__all__ = ["MaskedDenoiser", "blend_known"]
