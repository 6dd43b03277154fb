"""The whole guided denoiser call as one CUDA-graph replay: the ``[uncond; cond]`` batching, the network,
the guidance combination and the ``(eps, x0)`` conversion.

Why: with only the network call replayed from a graph (:class:`~ldm_sdk.accel.graphs.CapturedModel`), the
rest of a guided sampler step is ~45 small eager kernels -- the ``x`` / ``t`` / conditioning
concatenations, the guidance ``lerp``, the schedule look-ups and arithmetic of the ``(eps, x0)``
conversion -- each a launch of a few microseconds: 0.19 ms of a 6.7 ms SD-1.5 step at batch 1 on an H100
(``docs/performance-log.md``, "loop overhead"). Captured, they cost about what their arithmetic costs.

How: :class:`GuidedPrediction` is a function of the :data:`~ldm_sdk.diffusion.denoiser.ModelFn` shape,
``f(x, ts, c2) -> stack([eps, x0])``, where ``ts = stack([t, scale])`` carries the timesteps and the
per-sample guidance scale, and ``c2`` is the request's ``[uncond; cond]`` conditioning. It runs exactly the
ops of the eager ``ModelDenoiser(ClassifierFreeGuidance(model_fn, scale, uncond), schedule, p, cond)``
(:func:`~ldm_sdk.diffusion.guidance.guidance_combine`,
:func:`~ldm_sdk.diffusion.denoiser.prediction_from_output`; on CUDA the part after the network as one
Triton kernel, :mod:`ldm_sdk.accel.guided_combine`, computing the same IEEE operations), so the results
are the same bits -- unless
``share_input`` (what the tasks and the bench use on CUDA for a cross-attention-only UNet): then the
network gets ``x`` once and the ``[uncond; cond]`` context, and runs the layers before the first
cross-attention once for both halves (:meth:`~ldm_sdk.models.unet.UNetModel.forward`): the same math on a
batch half as large there, the same results up to the rounding of the library kernels at that batch
size. A
``CapturedModel`` over it -- :meth:`CapturedModel.companion` of the model's own, so it lives with the model's
cache entry -- copies ``x``, ``ts`` and ``c2`` into static buffers and replays: since the prompt, the negative
prompt and the scale are all inputs, one set of graphs serves every request with the same shapes. ``c2``
is copied (and the cross-attentions' K / V projection of it replayed, :mod:`ldm_sdk.accel.cond_prologue`)
only at a request's first step, or when another request's call came in between.
:func:`guided_denoiser` returns the per-request :class:`~ldm_sdk.diffusion.denoiser.Denoiser`; the sampler's
own update (DDIM's two multiply-adds, say) stays eager. Off CUDA (mode ``"auto"``) the call is a plain one,
so the same code runs everywhere; mode ``"emulate"`` runs the static-buffer logic on any device (the tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_sdk.accel import guided_combine
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.triton_kernels import KernelRecorder
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelFn, Prediction, batch_time, prediction_from_output, work_dtype
from ldm_sdk.diffusion.guidance import guidance_combine
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import Parameterization


class GuidedPrediction:
    """``f(x, ts, c2) -> stack([eps, x0])``: one guided denoiser call as a capturable function (see the
    module doc). ``ts`` is ``(2, B)``: timesteps, then guidance scales; ``c2`` the ``[uncond; cond]``
    conditioning of batch ``2B``. ``share_input``: call the network with ``x`` and ``t`` once and the
    ``2B`` context (a cross-attention-only conditioning; :meth:`~ldm_sdk.models.unet.UNetModel.forward`
    then runs the layers before the first cross-attention once for both halves); otherwise with both
    batched twice, as the eager guidance does."""

    #: set by :mod:`ldm_sdk.accel.precompile` while it records: the fused tail's launch is recorded (and
    #: compiled in parallel with the network's kernels before the capture) instead of made
    kernel_recorder: KernelRecorder | None = None

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: DiffusionSchedule,
        parameterization: Parameterization,
        share_input: bool = False,
    ) -> None:
        self.model_fn = model_fn
        self.schedule = schedule
        self.parameterization = parameterization
        self.share_input = share_input
        #: the guidance and the (eps, x0) conversion as one Triton kernel where it runs
        #: (:mod:`ldm_sdk.accel.guided_combine`), else the torch ops
        self.fuse_tail = True

    def __call__(self, x: Tensor, ts: Tensor, c2: Conditioning) -> Tensor:
        t, scale = ts[0], ts[1]
        if self.share_input:
            if tuple(c2.parts()) != ("crossattn",):
                raise ValueError(
                    f"share_input needs a cross-attention-only conditioning, got parts {list(c2.parts())}"
                )
            out = self.model_fn(x, t, c2)
        else:
            out = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), c2)
        if out.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape[1:])} per sample for x of shape "
                f"{tuple(x.shape[1:])}; an {self.parameterization!r} model must return x's shape (learned "
                "variance is unsupported)"
            )
        fused = self.fuse_tail and not torch.is_grad_enabled()
        if fused and guided_combine.fits(out, x, ts, self.parameterization):
            tables = self.schedule.tables(x.device)
            return guided_combine.guided_prediction(
                out, x, ts, tables, self.parameterization, recorder=self.kernel_recorder
            )
        out_uncond, out_cond = out.chunk(2)
        weight = scale.to(work_dtype(out_uncond)).reshape(-1, *([1] * (x.dim() - 1)))
        guided = guidance_combine(out_uncond, out_cond, weight)
        pred = prediction_from_output(self.schedule, self.parameterization, x, t, guided)
        return torch.stack([pred.eps, pred.x0])


class GuidedGraphDenoiser:
    """A :class:`~ldm_sdk.diffusion.denoiser.Denoiser` for one request whose every call is one replay of
    ``captured`` (a ``CapturedModel`` over :class:`GuidedPrediction`)."""

    def __init__(
        self,
        captured: CapturedModel,
        schedule: DiffusionSchedule,
        cond: Conditioning,
        uncond: Conditioning,
        scale: float,
    ) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        self.captured = captured
        self.schedule = schedule
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self._batch: tuple[int, Conditioning, Tensor] | None = None  # (B, c2, scales) of the last batch size

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        t = batch_time(t, x)
        batch = x.shape[0]
        kept = self._batch
        if kept is None or kept[0] != batch or kept[2].dtype != t.dtype or kept[2].device != t.device:
            c2 = Conditioning.cat(self.uncond.expand(batch), self.cond.expand(batch))
            kept = (batch, c2, torch.full((batch,), self.scale, dtype=t.dtype, device=t.device))
            self._batch = kept
        # the conditioning is this request's own [uncond; cond], made once per batch size and never changed
        out = self.captured(x, torch.stack([t, kept[2]]), kept[1], cond_unchanged=True)
        return Prediction(eps=out[0], x0=out[1])


def guided_denoiser(
    captured: CapturedModel,
    schedule: DiffusionSchedule,
    parameterization: Parameterization,
    cond: Conditioning,
    uncond: Conditioning,
    scale: float,
    *,
    share_input: bool = False,
) -> GuidedGraphDenoiser:
    """The guided denoiser of one request over the network of ``captured``, replayed whole from the graphs
    of its companion for (``schedule``, ``parameterization``, ``share_input``) (see the module doc and
    :class:`GuidedPrediction`)."""
    key = ("guided", id(schedule), parameterization, share_input)
    step = captured.companion(key, lambda fn: GuidedPrediction(fn, schedule, parameterization, share_input))
    return GuidedGraphDenoiser(step, schedule, cond, uncond, scale)


__all__ = ["GuidedGraphDenoiser", "GuidedPrediction", "guided_denoiser"]
