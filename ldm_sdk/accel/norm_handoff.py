"""GroupNorm statistics handed from the kernel that writes a map to the norm that reads it next: in the
first-stage decoder, the residual adds and the sub-pixel upsamplings produce the statistics of the next
block's first norm.

What: in the kl-f8 decoder every residual block ends with ``out = (conv2(h) + bias) + skip``, and every
upsampling with an interleave of its sub-pixel phases (:mod:`ldm_sdk.accel.subpixel`); the next module (a
residual block, the mid attention, the output norm) starts with a GroupNorm over ``out``, whose statistics
pass reads ``out`` again. :func:`bias_residual_add_with_stats` and the upsampling's interleave write
``out`` through the GroupNorm's own statistics kernel (a
:class:`~ldm_sdk.accel.triton_kernels.StatsSource`: each tile is formed, rounded, stored, and its
statistics taken from the rounded values), under the launch plan the norm will make; the norm then skips
its statistics pass (:func:`~ldm_sdk.accel.triton_kernels.group_norm_act` ``stats=``).

How the two meet: :class:`NormHandoff` holds at most one offer, ``(tensor, its version, statistics)``.
A producer offers what it wrote; a consumer takes the statistics only for the very tensor object, unchanged
since (its version counter), and the offer is used once. :func:`~ldm_sdk.accel.block_fusion.link_decoder`
(run by :func:`~ldm_sdk.accel.block_fusion.fuse_blocks`) gives a decoder's fused residual blocks, attention
blocks, upsamplings and output norm one shared handoff, and marks as producers the modules whose output
goes straight into one of those norms (every one but the last block of a level that upsamples). A
mismatch -- another tensor, a changed one, a norm with another group count -- only costs the fusion: the
consumer computes its statistics itself.

Numerics: the values stored are the ones the plain kernels write (the bias + residual sum of
:func:`~ldm_sdk.accel.residual_kernels.bias_residual_add`, the interleave plus bias: float32, rounded
once), and the statistics come from the same kernel code, tiles and plan as the norm's own pass over the
stored values, so the norm's output is the same bits with or without the handoff (tested in the Triton
interpreter and on the GPU).

Why: on an H100 the decoder's statistics passes over those maps read about 0.3 GB per 512 px decode (and
0.2 GB more after the upsamplings); the fused pass reads its inputs and writes ``out`` either way.
"""

from __future__ import annotations

import math
import weakref
from typing import cast

import torch
from torch import Tensor, nn

from ldm_sdk.accel import triton_kernels
from ldm_sdk.accel.residual_kernels import bias_residual_add
from ldm_sdk.accel.triton_kernels import (
    Backend,
    GroupNormStats,
    KernelRecorder,
    StatsSource,
    _check_kernel_input,
    _memory_format,
    _nhwc_statistics,
    _use_triton,
    default_plan,
    single_pass_tile,
)


class NormHandoff:
    """One pending offer of a map's GroupNorm statistics (see the module doc); ``groups`` is the group
    count the consumers normalise with, ``taken`` counts the offers used (tests, reports)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.taken = 0
        self._offer: tuple[weakref.ref[Tensor], int | None, GroupNormStats] | None = None

    def __getstate__(self) -> dict[str, object]:
        """Pickled (a whole fused model saved with ``torch.save``) without the pending offer: a weak
        reference does not pickle, and an offer is only good within one forward."""
        return {**self.__dict__, "_offer": None}

    def offer(self, tensor: Tensor, stats: GroupNormStats) -> None:
        # inference tensors keep no version counter: for them the identity is the check (link_decoder
        # offers only to the module that runs next, with nothing in between)
        version = None if tensor.is_inference() else tensor._version
        self._offer = (weakref.ref(tensor), version, stats)

    def take(self, x: Tensor, groups: int) -> GroupNormStats | None:
        """The statistics offered for ``x`` itself, unchanged since, under ``groups``; else None. Either way
        the offer is gone."""
        offer, self._offer = self._offer, None
        if offer is None or groups != self.groups:
            return None
        ref, version, stats = offer
        if ref() is not x or (version is not None and x._version != version):
            return None
        self.taken += 1
        return stats


def bias_residual_add_with_stats(
    y: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    *,
    residual_bias: Tensor | None = None,
    num_groups: int,
    recorder: KernelRecorder | None = None,
) -> tuple[Tensor, GroupNormStats]:
    """``(y + bias[c]) + (residual + residual_bias[c])`` for a 4-D channels_last ``y`` (a residual of the same
    shape and layout, or None), written by the GroupNorm statistics kernel, with the statistics of the result
    for ``num_groups`` groups under the default launch plan of its shape."""
    _check_kernel_input(y, "bias_residual_add_with_stats")
    if _memory_format(y) != torch.channels_last:
        raise ValueError(
            f"bias_residual_add_with_stats takes a 4-D channels_last y, got shape {tuple(y.shape)} with "
            f"strides {tuple(y.stride())}"
        )
    if residual is not None and (residual.shape != y.shape or residual.stride() != y.stride()):
        raise ValueError(
            f"the residual must have y's shape and strides {tuple(y.shape)} / {tuple(y.stride())}, got "
            f"{tuple(residual.shape)} / {tuple(residual.stride())}"
        )
    channels = y.shape[1]
    for name, vec in (("bias", bias), ("residual_bias", residual_bias)):
        if vec is not None and vec.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(vec.shape)}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must divide the {channels} channels, got {num_groups}")
    out = torch.empty_like(y)
    source = StatsSource(y, bias=bias, residual=residual, residual_bias=residual_bias)
    stats = _nhwc_statistics(out, y, 0, False, default_plan(y, num_groups), recorder, source=source)
    return out, stats


def wants_stats(handoff: NormHandoff | None, shape: tuple[int, ...]) -> bool:
    """Whether a channels_last map of ``shape`` written for ``handoff``'s norm should come with statistics:
    its channels split into the handoff's groups, and the norm would run a statistics pass (a norm that
    takes its one-launch kernel has none to save)."""
    if handoff is None or len(shape) != 4 or math.prod(shape) == 0 or shape[1] % handoff.groups:
        return False
    spatial = shape[2] * shape[3]
    # SINGLE_PASS_MAX read at call time, like the norm's own choice
    return single_pass_tile(spatial, shape[1] // handoff.groups) > triton_kernels.SINGLE_PASS_MAX


def residual_add_for_norm(
    y: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    *,
    residual_bias: Tensor | None = None,
    handoff: NormHandoff | None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`~ldm_sdk.accel.residual_kernels.bias_residual_add`, offering the result's statistics to
    ``handoff`` where the Triton path runs on a channels_last map (else the plain add, nothing offered)."""
    fits = (
        wants_stats(handoff, tuple(y.shape))
        and _memory_format(y) == torch.channels_last
        and (residual is None or (residual.shape == y.shape and residual.stride() == y.stride()))
    )
    if fits and _use_triton(backend, "bias_residual_add", y, bias, residual, residual_bias):
        out, stats = bias_residual_add_with_stats(
            y,
            bias,
            residual,
            residual_bias=residual_bias,
            num_groups=cast(NormHandoff, handoff).groups,
            recorder=recorder,
        )
        cast(NormHandoff, handoff).offer(out, stats)
        return out
    return bias_residual_add(
        y, bias, residual, residual_bias=residual_bias, backend=backend, recorder=recorder
    )


def taken_stats(module: nn.Module, x: Tensor, groups: int) -> GroupNormStats | None:
    """The statistics ``module``'s handoff holds for ``x`` (None without a handoff or an offer for it)."""
    handoff = cast(NormHandoff | None, getattr(module, "norm_handoff", None))
    return handoff.take(x, groups) if handoff is not None else None


__all__ = [
    "NormHandoff",
    "bias_residual_add_with_stats",
    "residual_add_for_norm",
    "taken_stats",
    "wants_stats",
]
