"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a raw model function.

Guidance acts on the raw network output: ``out = u + scale * (c - u)``. For "eps" and "v" models this is the
same as guiding the noise estimate, because at fixed ``x_t`` both eps and x0 are affine in the output with
coefficients that do not depend on the conditioning. As CompVis ``DDIMSampler.p_sample_ddim`` does, the
unconditional and conditional passes run as one batch ``[uncond; cond]``; with ``scale == 1`` only the
conditional pass runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelFn, work_dtype


def guidance_combine(uncond_out: Tensor, cond_out: Tensor, scale: float | Tensor) -> Tensor:
    """``u + scale * (c - u)`` as one ``torch.lerp`` in the diffusion work dtype (float32, float64 for
    float64 outputs): half-precision network outputs are upcast first, so the guided output is not rounded
    back to fp16 / bf16 (it goes to the float32 (eps, x0) conversion next). ``scale`` a float, or a tensor
    broadcastable to the outputs in the work dtype (the captured step's per-sample scale): either gives the
    same bits, ``lerp`` computes in float32 for both."""
    dtype = work_dtype(uncond_out)
    return torch.lerp(uncond_out.to(dtype), cond_out.to(dtype), scale)


class ClassifierFreeGuidance:
    """A ``ModelFn`` returning ``u + scale * (c - u)`` from one batched call of ``model_fn``
    (:func:`guidance_combine`: one ``lerp`` in float32 of the upcast outputs).

    ``uncond`` is the unconditional conditioning (e.g. the empty-prompt embedding); a batch of 1 is
    repeated to the batch of ``x``. It must carry the same parts as the conditional one (for
    concat-conditioned inpainting models, give it the same ``concat`` maps).
    """

    def __init__(self, model_fn: ModelFn, scale: float, uncond: Conditioning) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        self.model_fn = model_fn
        self.scale = float(scale)
        self.uncond = uncond

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if self.scale == 1.0:
            return self.model_fn(x, t, cond)
        batch = x.shape[0]
        c_in = Conditioning.cat(self.uncond.expand(batch), cond.expand(batch))
        x_in = torch.cat([x, x])
        t_in = torch.cat([t, t])
        out_uncond, out_cond = self.model_fn(x_in, t_in, c_in).chunk(2)
        return guidance_combine(out_uncond, out_cond, self.scale)


__all__ = ["ClassifierFreeGuidance", "guidance_combine"]
