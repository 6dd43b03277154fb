"""Every cross-attention's K / V projection of the context as one GEMM per UNet call.

Why: the SD-1.5 UNet has 16 cross-attentions, each projecting the same context (the prompt embeddings,
``(2B, 77, 768)`` under guidance) to its keys and values: 16 GEMMs of ``(2B 77, 768) x (768, 2C)`` per step,
about 61 us of a 5.9 ms step at batch 2 on an H100, most of it launch and ramp-up of tiny products
(``bench/results/op_roofline_session5_b2_h100.json``: 3.6-4.1 us each for 0.1-0.6 GFLOP). One GEMM over
all of their weights reads the context once and fills the GPU.

How: :func:`share_context_projections` moves the K / V weights of a UNet's fused cross-attentions (those
whose context width differs from their query width, so their ``to_k`` / ``to_v`` already form one stacked
K / V weight, :class:`~ldm_sdk.accel.block_fusion.FusedCrossAttention`) back to back into one storage,
in module order (each Parameter stays itself, a view: state dicts and in-place loading are unchanged), and
gives each of them a :class:`ContextProjections` with its column range. The first of them to run in a UNet
call projects the context through all of them at once; the others take their slice of that result (a view
with the whole result's row stride: the attention kernels read it in place). The result is remembered for
the context *tensor* it was computed from, and only within one UNet call: a forward pre-hook on the UNet
starts a new call, so a context changed in place between calls (a static graph input) is projected again.
If the weights no longer share their storage (moved, cast, replaced), each attention projects on its own.

Across calls: the ``ContextProjections`` is also the UNet's ``conditioning_prologue``
(:mod:`ldm_sdk.accel.cond_prologue`). A captured call then projects the static context in a graph of its
own, replayed only when the context is copied in anew, and the step's graph reads that result
(:meth:`ContextProjections.holding`): the projection leaves the per-step graph.

Numerics: the same products, in one GEMM instead of sixteen: cuBLAS may pick another kernel, so the keys
and values can differ from the separate GEMMs' by float32 summation order before the rounding to the
weights' dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.stacking import stack_storage, stacked_view
from ldm_sdk.diffusion.conditioning import Conditioning


class ContextProjections:
    """The shared K / V projection of a UNet's cross-attentions (see the module doc); attention ``i`` owns
    columns ``bounds[i]`` (its K, then its V)."""

    def __init__(self, attentions: Sequence[nn.Module]) -> None:
        if not attentions:
            raise ValueError("ContextProjections needs at least one attention")
        self.weights: list[Tensor] = []
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for attn in attentions:
            for lin in (attn.to_k, attn.to_v):
                self.weights.append(lin.weight)
                start += lin.out_features
            self.bounds.append((start - attn.to_k.out_features - attn.to_v.out_features, start))
        stack_storage(self.weights)
        self._call = 0
        self._memo: tuple[int, Tensor, Tensor] | None = None  # (call, context, projections)
        self._held: tuple[Tensor, Tensor] | None = None  # (context, projections) across calls: holding()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the remembered or held results (they belong to calls)."""
        return {**self.__dict__, "_memo": None, "_held": None}

    def compute(self, cond: Conditioning) -> Tensor | None:
        """``cond``'s context through every attention's K / V weights (the conditioning prologue of
        :mod:`ldm_sdk.accel.cond_prologue`), or None where it does not apply: no tensor context, or one of
        another dtype, device or width than the weights (the UNet's call then projects it itself), or
        weights no longer in one storage."""
        context = cond.crossattn
        weight = stacked_view(self.weights)
        if not isinstance(context, Tensor) or weight is None:
            return None
        if (context.dtype, context.device, context.shape[-1]) != (
            weight.dtype,
            weight.device,
            weight.shape[1],
        ):
            return None
        return F.linear(context, weight)

    @contextlib.contextmanager
    def holding(self, cond: Conditioning, result: Tensor) -> Iterator[None]:
        """Within the context, calls with exactly ``cond``'s context tensor take their keys and values from
        ``result`` (:meth:`compute` on it) instead of projecting it."""
        if not isinstance(cond.crossattn, Tensor):
            raise ValueError("holding() needs a conditioning with a tensor crossattn part")
        previous = self._held
        self._held = (cond.crossattn, result)
        try:
            yield
        finally:
            self._held = previous

    def new_call(self, *_: object) -> None:
        """Forget the remembered projections: a new UNet call starts (the UNet's forward pre-hook)."""
        self._call += 1
        self._memo = None

    def kv(self, index: int, context: Tensor) -> Tensor | None:
        """Attention ``index``'s ``context @ [W_k; W_v]^T`` as a ``(B, M, 2 inner)`` view of the shared
        result (computed once per context tensor and call), or None when the weights no longer lie in one
        storage (the attention then projects on its own)."""
        held = self._held
        if held is not None and held[0] is context:
            start, stop = self.bounds[index]
            return held[1][..., start:stop]
        memo = self._memo
        if memo is None or memo[0] != self._call or memo[1] is not context:
            weight = stacked_view(self.weights)
            if weight is None:
                return None
            memo = (self._call, context, F.linear(context, weight))
            self._memo = memo
        start, stop = self.bounds[index]
        return memo[2][..., start:stop]


def share_context_projections(unet: nn.Module, attentions: Sequence[nn.Module]) -> ContextProjections | None:
    """Give ``attentions`` (fused cross-attentions of ``unet`` with a stacked K / V weight, in the order they
    run) one :class:`ContextProjections` (their ``context_projections`` / ``context_index``) and ``unet`` the
    pre-hook that starts a new call; None (nothing changed) for fewer than two or for mixed context widths,
    dtypes or devices."""
    if len(attentions) < 2:
        return None
    weights = [lin.weight for a in attentions for lin in (a.to_k, a.to_v)]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
        return None
    shared = ContextProjections(attentions)
    for i, attn in enumerate(attentions):
        attn.context_projections = shared
        attn.context_index = i
    unet._context_projections_hook = unet.register_forward_pre_hook(shared.new_call)  # type: ignore[assignment]
    unet.__dict__["conditioning_prologue"] = shared  # ldm_sdk.accel.cond_prologue: once per conditioning
    return shared


def unshare_context_projections(unet: nn.Module) -> None:
    """Remove what :func:`share_context_projections` set (the weights stay where they are)."""
    hook = unet.__dict__.pop("_context_projections_hook", None)
    if hook is not None:
        hook.remove()
    for m in unet.modules():
        m.__dict__.pop("context_projections", None)
        m.__dict__.pop("context_index", None)
        m.__dict__.pop("conditioning_prologue", None)


__all__ = ["ContextProjections", "share_context_projections", "unshare_context_projections"]
