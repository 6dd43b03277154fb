"""Classifier-free guidance and the ``(eps, x0)`` conversion of a guided denoiser call as one Triton kernel.

Why: after the network, a guided step (:class:`~ldm_sdk.accel.guided_step.GuidedPrediction`) ran about 30
small torch kernels: the float64 schedule look-up of the timestep (floor, clamp, gathers, ``exp``,
``where``, ``sqrt``: :meth:`~ldm_sdk.diffusion.schedule.ScheduleTables.signal_noise_scales`), the upcasts of
the two network halves, the guidance ``lerp``, the conversion's multiply-adds and the ``stack`` of the
result -- each a launch of 1-3 us on a few thousand values, inside the captured step or not. Here one kernel
does all of it: every program looks up its sample's coefficients (a handful of float64 scalar operations)
and converts one tile of that sample.

What it computes, per sample ``b``, element by element, in float32 unless said otherwise:

* ``sqrt_ab, sqrt_1m`` at the float64 timestep ``t[b]``, as the schedule's look-up does it: at an integer
  ``t`` the ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod`` table values, elsewhere
  ``ab = 1 / (1 + sigma^2)`` with ``log sigma`` interpolated between the neighbouring integer steps, and
  its square roots (float64, clamped into the table as the look-up does);
* ``g = lerp(u, c, s)`` of the upcast halves ``u = out[b]``, ``c = out[B + b]`` with the scale ``s[b]``
  (torch's two-sided ``lerp`` formula, :func:`~ldm_sdk.diffusion.guidance.guidance_combine`);
* ``eps``: ``(g, c1 x - c2 g)``; ``x0``: ``((c1 x - g) / c2, g)``; ``v``: ``(sa g + s1 x, sa x - s1 g)``
  with ``c1 = 1 / sqrt_ab``, ``c2 = sqrt_1m / sqrt_ab`` (float64, then float32), ``sa``, ``s1`` the scales
  in float32 (:func:`~ldm_sdk.diffusion.denoiser.prediction_from_output`).

The result is ``stack([eps, x0])`` (float32, each half with ``x``'s strides), the same bits as the torch
ops it replaces on CUDA: the same IEEE-rounded operations in the same order (correctly rounded division and
square root, libdevice's ``exp`` as torch's CUDA kernels call it), no multiply-add contraction except the
two ``lerp`` forms, which torch's CUDA kernel computes as fused multiply-adds. So a captured step still
equals the eager one bit for bit (``tests/tasks/test_gpu_tasks.py``); the tests compare the kernel with the
torch path on the GPU (exactly) and in the Triton interpreter (to float32 rounding: numpy's ``exp`` and
products differ from libdevice's).

Limits (:func:`fits`): ``out`` of ``2 B`` samples in fp16 / bf16 / float32 and ``x`` of ``B`` samples in
float32 with the same dense per-sample layout (contiguous or channels_last), ``ts`` the ``(2, B)`` float64
rows of timesteps and scales, parameterization ``eps`` / ``x0`` / ``v``; otherwise callers keep the torch
ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_sdk.accel.triton_kernels import KernelRecorder, _interpreting, launch, triton
from ldm_sdk.diffusion.schedule import ScheduleTables
from ldm_sdk.models.configs import Parameterization

PARAMETERIZATIONS: dict[str, int] = {"eps": 0, "x0": 1, "v": 2}
"""The kernel's code of each parameterization it converts."""
BLOCK = 1024
"""Elements per program."""


def fits(out: Tensor, x: Tensor, ts: Tensor, parameterization: str) -> bool:
    """Whether :func:`guided_prediction` takes these: a Triton-capable device (CUDA, or the CPU under the
    interpreter), ``x`` float32 ``(B, ...)`` and ``out`` ``(2 B, ...)`` fp16 / bf16 / float32 with one dense
    per-sample layout, ``ts`` ``(2, B)`` float64 and contiguous, a known parameterization."""
    if triton is None or parameterization not in PARAMETERIZATIONS or not (x.is_cuda or _interpreting()):
        return False
    b = x.shape[0]
    per_sample = x[0].numel() if b else 0
    return (
        b > 0
        and x.dtype == torch.float32
        and out.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and ts.dtype == torch.float64
        and ts.shape == (2, b)
        and ts.is_contiguous()
        and out.shape == (2 * b, *x.shape[1:])
        and out.device == x.device == ts.device
        and out.stride() == x.stride()
        and x.stride(0) == per_sample
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    )


def guided_prediction(
    out: Tensor,
    x: Tensor,
    ts: Tensor,
    tables: ScheduleTables,
    parameterization: Parameterization,
    *,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """``stack([eps, x0])`` (float32) of the guided output of ``out`` (the network's ``[uncond; cond]``
    halves) at ``x``, timesteps ``ts[0]`` and scales ``ts[1]`` (see the module doc); ``tables``: the
    schedule's float64 look-up tables on ``x``'s device."""
    if not fits(out, x, ts, parameterization):
        raise ValueError(
            "guided_prediction takes x float32 (B, ...), out (2 B, ...) fp16 / bf16 / float32 with x's dense "
            "per-sample layout, ts (2, B) float64 contiguous and parameterization eps / x0 / v; got "
            f"x {x.dtype} {tuple(x.shape)} strides {x.stride()}, out {out.dtype} {tuple(out.shape)} strides "
            f"{out.stride()}, ts {ts.dtype} {tuple(ts.shape)}, {parameterization!r}"
        )
    if tables.device != x.device:
        raise ValueError(f"the schedule tables are on {tables.device} but x is on {x.device}")
    b = x.shape[0]
    per_sample = x[0].numel()
    result = torch.empty_strided((2, *x.shape), (b * per_sample, *x.stride()), dtype=x.dtype, device=x.device)
    launch(
        _guided_prediction_kernel,
        (triton.cdiv(per_sample, BLOCK), b),
        recorder,
        out,
        x,
        ts,
        result,
        tables.alphas_cumprod,
        tables.sqrt_alphas_cumprod,
        tables.sqrt_one_minus_alphas_cumprod,
        tables.log_sigmas,
        b,
        per_sample,
        tables.log_sigmas.shape[0] - 1,
        PARAM=PARAMETERIZATIONS[parameterization],
        BLOCK=BLOCK,
        num_warps=4,
        # no multiply-add contraction beyond the explicit ones: torch's separate kernels round every product
        enable_fp_fusion=False,
    )
    return result


if triton is not None:
    from ldm_sdk.kernels.guided_combine import (
        _guided_prediction_kernel,
    )


__all__ = ["BLOCK", "PARAMETERIZATIONS", "fits", "guided_prediction"]
