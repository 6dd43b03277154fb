"""Inference fast paths: CUDA-graph capture of the denoising call, and CPU inference settings.

- :mod:`ldm_sdk.accel.graphs`: :class:`CapturedModel` replays the (guidance-batched) network call as a CUDA
  graph, which removes the per-kernel launch cost that bounds the eager UNet step on a fast GPU;
  :func:`accelerate_denoiser` wraps a bundle or model function so the samplers' API stays unchanged.
- :mod:`ldm_sdk.accel.fusion`: :func:`fuse_model` switches a model's GroupNorm (+ the SiLU after it) and
  GEGLU modules, in place, to the fused Triton kernels of :mod:`ldm_sdk.accel.triton_kernels` (float32
  torch references off CUDA); :func:`accelerate_denoiser` applies it to half-precision CUDA models.
- :mod:`ldm_sdk.accel.cpu`: :func:`configure_cpu_inference` (bf16 weights where the CPU computes bf16
  natively, channels_last, one torch thread per usable core) and :func:`cpu_features`.
"""

from __future__ import annotations

from ldm_sdk.accel.cpu import CpuFeatures, CpuInference, configure_cpu_inference, cpu_features
from ldm_sdk.accel.fusion import FusionReport, fuse_model, unfuse_model
from ldm_sdk.accel.graphs import (
    CallSignature,
    CapturedModel,
    CaptureError,
    CaptureMode,
    TensorSpec,
    accelerate_denoiser,
    bundle_denoiser,
)

__all__ = [
    "CallSignature",
    "CaptureError",
    "CaptureMode",
    "CapturedModel",
    "CpuFeatures",
    "CpuInference",
    "FusionReport",
    "TensorSpec",
    "accelerate_denoiser",
    "bundle_denoiser",
    "configure_cpu_inference",
    "cpu_features",
    "fuse_model",
    "unfuse_model",
]
