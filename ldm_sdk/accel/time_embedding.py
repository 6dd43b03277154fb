"""Every fused residual block's time-embedding projection of one UNet as a single GEMM per call.

Why: each SD-1.5 ``ResBlock`` projects the same timestep embedding (``SiLU`` then its own ``Linear``) and,
fused, adds conv1's bias to it (:class:`~ldm_sdk.accel.block_fusion.FusedResBlock` folds the sum into its
output GroupNorm as a per-(sample, channel) shift). With 22 blocks that is 22 x (a SiLU kernel, a bias add,
a small GEMM) per UNet call: 66 launches of a few microseconds each in a step that is bound by latency at
batch 2.

How: :func:`share_embedding_projection` (run by :func:`~ldm_sdk.accel.block_fusion.fuse_blocks` on every
``UNetModel``) moves the blocks' projection weights, projection biases and conv1 biases, each set into one
storage back to back (:mod:`ldm_sdk.accel.stacking`; the Parameters stay themselves, as views, so state
dicts and in-place loading are unchanged). The first block called with a given ``emb`` tensor computes

    shifts = addmm(proj_biases + conv1_biases, silu(emb), proj_weights^T)      # (B, sum of C_i)

and every block of that call reads its columns ``shifts[:, start_i:stop_i]`` as a row-strided view, which
the GroupNorm kernel takes in place (3 launches per call instead of 66). The result is remembered with the
``emb`` it came from, by identity: ``UNetModel.forward`` builds one new ``emb`` per call and hands that
object to all its blocks, so a new call never sees an old result. The memo is one tuple attribute replaced
whole, so calls from several threads stay correct (at worst one computes it twice). If a Parameter got new
memory since (``.to()``, assigned ``.data``), :meth:`EmbeddingShifts.shift` returns None and the block
projects on its own, as before.

Numerics: each column is the same dot product as the block's own ``addmm``; a wider GEMM may sum in another
order, so half-precision results can differ by float32 accumulation noise before their one rounding.

The sinusoidal features of the timesteps before the embedding MLP: :func:`timestep_features`. torch builds
them with ten small kernels per UNet call (the batch repeated for the guidance copies, ``arange``, two
scalings, ``exp``, the product with ``t``, ``cos``, ``sin``, the concatenation, the cast to the weights'
dtype), about 20 us at the head of every SD-1.5 step on an H100 (``bench/profile_guided_step.py``). On CUDA
one Triton kernel computes them: the same IEEE float32 operations in the same order, the same libdevice
``exp`` / ``cos`` / ``sin`` functions that torch's CUDA kernels call, one rounding to the output dtype --
the same bits as :func:`~ldm_sdk.models.embeddings.timestep_embedding` followed by ``.to(dtype)`` on CUDA
(the GPU test compares them exactly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.stacking import stack_storage, stacked_view
from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    Backend,
    KernelRecorder,
    _interpreting,
    _needs_grad,
    launch,
    triton,
)
from ldm_sdk.models.attention import repeat_batch
from ldm_sdk.models.embeddings import timestep_embedding
from ldm_sdk.models.unet import ResBlock

#: the timestep dtypes and the output dtypes the features kernel takes
FEATURE_TIME_DTYPES = (torch.float64, torch.float32, torch.int64, torch.int32)
FEATURE_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class EmbeddingShifts:
    """The shared projection of a group of residual blocks (see the module doc); block ``i`` of the group
    owns columns ``bounds[i]``."""

    def __init__(self, blocks: Sequence[ResBlock]) -> None:
        if not blocks:
            raise ValueError("EmbeddingShifts needs at least one block")
        projs = [_projection(b) for b in blocks]
        self.weights = [p.weight for p in projs]
        self.proj_biases = [cast(Tensor, p.bias) for p in projs]
        self.conv_biases = [cast(Tensor, cast(nn.Conv2d, b.in_layers[-1]).bias) for b in blocks]
        for params in (self.weights, self.proj_biases, self.conv_biases):
            stack_storage(params)
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for p in projs:
            self.bounds.append((start, start + p.out_features))
            start += p.out_features
        self._memo: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.bounds)

    def shift(self, index: int, emb: Tensor) -> Tensor | None:
        """Block ``index``'s ``conv1.bias + proj(silu(emb))`` as a ``(B, C)`` view of the shared result
        (computed once per ``emb``), or None when the Parameters no longer share their storage. For an
        ``emb`` that is the leading rows of a larger tensor (the UNet's shared guidance input takes the
        first rows of the whole batch's embedding) the projection is made for that tensor and sliced, so
        the layers before and after the guidance copies part share one GEMM."""
        rows = emb.shape[0]
        base = emb._base
        if base is not None and _leading_rows(emb, base):
            emb = base
        memo = self._memo
        if memo is None or memo[0] is not emb:
            shifts = self._project(emb)
            if shifts is None:
                return None
            memo = (emb, shifts)
            self._memo = memo
        start, stop = self.bounds[index]
        return memo[1][:rows, start:stop]

    def _project(self, emb: Tensor) -> Tensor | None:
        weight = stacked_view(self.weights)
        proj_bias = stacked_view(self.proj_biases)
        conv_bias = stacked_view(self.conv_biases)
        if weight is None or proj_bias is None or conv_bias is None:
            return None
        return torch.addmm(proj_bias + conv_bias, F.silu(emb), weight.t())


def _leading_rows(view: Tensor, base: Tensor) -> bool:
    """Whether ``view`` is ``base[:k]`` (same memory start, row layout and trailing shape)."""
    return (
        view.dim() == base.dim() == 2
        and view.data_ptr() == base.data_ptr()
        and view.stride() == base.stride()
        and view.shape[1] == base.shape[1]
        and view.shape[0] <= base.shape[0]
    )


def _projection(block: ResBlock) -> nn.Linear:
    return cast(nn.Linear, block.emb_layers[1])


def _shareable(blocks: Sequence[ResBlock]) -> bool:
    """One embedding width, and every weight and bias of one dtype and device."""
    projs = [_projection(b) for b in blocks]
    tensors = [
        t for b, p in zip(blocks, projs, strict=True) for t in (p.weight, p.bias, b.in_layers[-1].bias)
    ]
    if any(not isinstance(t, Tensor) for t in tensors):
        return False
    return len({p.in_features for p in projs}) == 1 and len({(t.dtype, t.device) for t in tensors}) == 1


def share_embedding_projection(blocks: Sequence[ResBlock]) -> EmbeddingShifts | None:
    """Give ``blocks`` (fused residual blocks of one network, each with a SiLU + Linear embedding
    projection and a conv1 bias) one :class:`EmbeddingShifts`, set as their ``emb_shifts`` with their
    ``emb_shift_index``; None (nothing changed) for fewer than two blocks or mixed widths, dtypes or
    devices."""
    if len(blocks) < 2 or not _shareable(blocks):
        return None
    shared = EmbeddingShifts(blocks)
    for i, block in enumerate(blocks):
        block.emb_shifts = shared  # type: ignore[attr-defined]
        block.emb_shift_index = i  # type: ignore[attr-defined]
    return shared


def timestep_features(
    timesteps: Tensor,
    dim: int,
    dtype: torch.dtype,
    repeats: int = 1,
    *,
    max_period: float = 10000,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``timestep_embedding(repeat_batch(timesteps, repeats), dim, max_period).to(dtype)`` (see the module
    doc): one Triton kernel on CUDA outside autograd (``backend="auto"``; ``"triton"`` forces it, also on the
    CPU under the interpreter; ``"reference"`` never runs it), else the torch ops."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    problem = _features_problem(timesteps, dim, dtype)
    if backend == "triton" and problem is not None:
        raise ValueError(f"the timestep features kernel takes {problem}; use backend='auto'")
    use = backend == "triton" or (
        backend == "auto" and problem is None and timesteps.is_cuda and not _needs_grad(timesteps)
    )
    if not use:
        return timestep_embedding(repeat_batch(timesteps, repeats), dim, max_period).to(dtype)
    b = timesteps.shape[0]
    out = torch.empty((b * repeats, dim), device=timesteps.device, dtype=dtype)
    if out.numel():
        half = dim // 2
        # float32 values as torch's kernels use them: the scalar rounded, its reciprocal in float32
        neg_log_period = float(np.float32(-math.log(max_period)))
        inv_half = float(np.float32(1.0) / np.float32(half))
        grid = (b * repeats,)
        args = (timesteps.contiguous(), out, b, half, dim, neg_log_period, inv_half)
        block = _pow2(half)
        libdev = not _interpreting()
        launch(_timestep_features_kernel, grid, recorder, *args, BLOCK=block, LIBDEVICE=libdev, num_warps=2)
    return out


def _features_problem(timesteps: Tensor, dim: int, dtype: torch.dtype) -> str | None:
    """None when the features kernel takes these, else what it takes."""
    if triton is None or not (timesteps.is_cuda or _interpreting()):
        return "a CUDA device with Triton (or the Triton interpreter)"
    if timesteps.ndim != 1 or timesteps.dtype not in FEATURE_TIME_DTYPES:
        return (
            f"1-D timesteps of {FEATURE_TIME_DTYPES}, got {timesteps.dtype} of shape {tuple(timesteps.shape)}"
        )
    if dtype not in FEATURE_OUT_DTYPES:
        return f"an output dtype of {FEATURE_OUT_DTYPES}, got {dtype}"
    if dim < 2:
        return f"at least 2 features, got {dim}"
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


if triton is not None:
    from ldm_sdk.kernels.time_embedding import _timestep_features_kernel


__all__ = ["EmbeddingShifts", "share_embedding_projection", "timestep_features"]
