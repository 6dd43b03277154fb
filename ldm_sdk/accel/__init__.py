"""Inference fast paths: CUDA-graph capture of the denoising call, fused kernels, and CPU inference settings.

- :mod:`ldm_sdk.accel.graphs`: :class:`CapturedModel` replays the (guidance-batched) network call as a CUDA
  graph, which removes the per-kernel launch cost that bounds the eager UNet step on a fast GPU;
  :func:`accelerate_denoiser` wraps a bundle or model function so the samplers' API stays unchanged;
  :mod:`ldm_sdk.accel.guided_step` replays a whole guided denoiser call (batching, network, guidance,
  eps / x0) as one graph, the tasks' path with guidance (in half precision with the two halves sharing
  their input: :meth:`ldm_sdk.models.unet.UNetModel.forward`), its guidance and eps / x0 conversion one
  Triton kernel, :mod:`ldm_sdk.accel.guided_combine`; captured memset nodes become fill kernels,
  :mod:`ldm_sdk.accel.graph_memsets`.
- :mod:`ldm_sdk.accel.fusion`: :func:`fuse_model` switches a model's GroupNorm (+ the SiLU after it) and
  GEGLU modules, in place, to the fused Triton kernels of :mod:`ldm_sdk.accel.triton_kernels` (float32
  torch references off CUDA); :mod:`ldm_sdk.accel.block_fusion`: :func:`fuse_blocks` folds conv biases,
  the timestep embedding and residual adds of the residual / transformer blocks into the norms
  (:mod:`ldm_sdk.accel.residual_kernels`; one embedding GEMM per UNet call,
  :mod:`ldm_sdk.accel.time_embedding`; the GEGLU dual GEMM, :mod:`ldm_sdk.accel.geglu_gemm`, on Hopper
  as a persistent TMA kernel, :mod:`ldm_sdk.accel.geglu_tma`; upsampling
  kernels, :mod:`ldm_sdk.accel.nearest_upsample` and :mod:`ldm_sdk.accel.subpixel`; thin-output convolutions,
  :mod:`ldm_sdk.accel.thin_conv`; tiny-map convolutions as im2col + GEMM, :mod:`ldm_sdk.accel.small_conv`;
  on Hopper the decoder's wide convolutions and upsamplings as our own implicit GEMMs ending in the bias,
  residual and next norm's statistics, :mod:`ldm_sdk.accel.implicit_conv`; the
  first stage's attention block, :mod:`ldm_sdk.accel.vae_attention`, with its softmax,
  :mod:`ldm_sdk.accel.row_softmax`; norm statistics produced by the kernel that writes the map before the
  norm, :mod:`ldm_sdk.accel.norm_handoff`; attention over short key sequences as one Triton tile,
  :mod:`ldm_sdk.accel.short_attention`; every cross-attention's K / V projection as one GEMM,
  :mod:`ldm_sdk.accel.context_projections`; the skip concatenations as one copy kernel,
  :mod:`ldm_sdk.accel.skip_concat`);
  :func:`prepare_cuda_inference` (:mod:`ldm_sdk.accel.prepare`:
  both fusions + channels_last weights) is what the runtime and :func:`accelerate_denoiser` do to
  half-precision CUDA models. The Triton kernels themselves live in :mod:`ldm_sdk.kernels` (torch-free),
  one module per launching module here.
- Cold start: :mod:`ldm_sdk.accel.precompile` compiles a call's kernel variants in parallel before its
  first capture; :mod:`ldm_sdk.accel.compile_ahead` compiles a later call's (the decoder's, while the
  sampler runs) in background worker processes (:mod:`ldm_sdk.kernels.compile_workers`).
- :mod:`ldm_sdk.accel.cpu`: :func:`configure_cpu_inference` (bf16 weights where the CPU computes bf16
  natively, channels_last, one torch thread per usable core, the cross-attention K/V cache of
  :mod:`ldm_sdk.accel.kv_cache` and the prepacked weights of :mod:`ldm_sdk.accel.cpu_prepack`) and
  :func:`cpu_features`.
"""

from __future__ import annotations

from ldm_sdk.accel.block_fusion import BlockFusionReport, fuse_blocks, unfuse_blocks
from ldm_sdk.accel.cpu import CpuFeatures, CpuInference, configure_cpu_inference, cpu_features
from ldm_sdk.accel.cpu_prepack import PrepackReport, prepack_cpu_weights, unpack_cpu_weights
from ldm_sdk.accel.fusion import FusionReport, fuse_model, unfuse_model
from ldm_sdk.accel.graphs import (
    CallSignature,
    CapturedModel,
    CaptureError,
    CaptureMemoryError,
    CaptureMode,
    TensorSpec,
    accelerate_denoiser,
    bundle_denoiser,
)
from ldm_sdk.accel.kv_cache import cache_context_projections, uncache_context_projections
from ldm_sdk.accel.prepare import CudaInferenceReport, prepare_cuda_inference

__all__ = [
    "BlockFusionReport",
    "CallSignature",
    "CaptureError",
    "CaptureMemoryError",
    "CaptureMode",
    "CapturedModel",
    "CpuFeatures",
    "CpuInference",
    "CudaInferenceReport",
    "FusionReport",
    "PrepackReport",
    "TensorSpec",
    "accelerate_denoiser",
    "bundle_denoiser",
    "cache_context_projections",
    "configure_cpu_inference",
    "cpu_features",
    "fuse_blocks",
    "fuse_model",
    "prepack_cpu_weights",
    "prepare_cuda_inference",
    "uncache_context_projections",
    "unfuse_blocks",
    "unfuse_model",
    "unpack_cpu_weights",
]
