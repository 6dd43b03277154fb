"""What the runtime does to a model whose weights are on CUDA in fp16 / bf16 before it runs it: fuse the
norms (:func:`~ldm_sdk.accel.fusion.fuse_model`), fuse the blocks
(:func:`~ldm_sdk.accel.block_fusion.fuse_blocks`) and make the weights channels_last.

Why channels_last: cuDNN's Hopper convolution kernels work in NHWC and convert NCHW tensors on the way in
and out; with channels_last weights the SD-1.5 UNet step went from 10.5 to 7.5 ms of GPU time (H100, fp16,
fused, docs/performance-log.md), the VAE decode from 10.7 to 8.3 ms. The fused GroupNorm kernels have a
channels_last path of their own, and on channels_last maps the transformer projections run as GEMMs with
no layout copy. Accuracy against float32 is unchanged (other roundings of the same size). The runtime
calls this on every model it loads, so eager and CUDA-graph runs of a cached model share the same numerics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ldm_sdk.accel.block_fusion import BlockFusionReport, fuse_blocks
from ldm_sdk.accel.fusion import FusionReport, fuse_model


def half_precision_on_cuda(modules: Sequence[nn.Module]) -> bool:
    """True when every module's weights are on CUDA in fp16 / bf16: where fusing pays (fewer kernels, one
    rounding instead of several) and the float32 / CPU numerics stay untouched."""
    firsts = [next(m.parameters(), None) for m in modules]
    return bool(firsts) and all(
        p is not None and p.is_cuda and p.dtype in (torch.float16, torch.bfloat16) for p in firsts
    )


@dataclass(frozen=True)
class CudaInferenceReport:
    """What :func:`prepare_cuda_inference` changed: the norm / GEGLU fusion and the block fusion."""

    norms: FusionReport
    blocks: BlockFusionReport

    def __str__(self) -> str:
        return f"{self.norms}\n{self.blocks}\nweights channels_last"


def prepare_cuda_inference(module: nn.Module) -> CudaInferenceReport | None:
    """For a model whose weights are on CUDA in fp16 / bf16: norm fusion, block fusion (both backend
    ``"auto"``) and channels_last weights, in place; else nothing (``None``). Undo the fusions with
    :func:`~ldm_sdk.accel.fusion.unfuse_model`."""
    if not half_precision_on_cuda([module]):
        return None
    module.to(memory_format=torch.channels_last)  # first: block fusion re-stores attention weights
    norms = fuse_model(module)
    blocks = fuse_blocks(module)
    return CudaInferenceReport(norms, blocks)


__all__ = ["CudaInferenceReport", "half_precision_on_cuda", "prepare_cuda_inference"]
