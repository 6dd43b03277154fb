"""The GEGLU feed-forward projection and its gating as one Triton "dual GEMM", with a pure-torch reference.

What
----
* :func:`geglu_linear` -- ``a * gelu(gate)`` for ``a, gate = F.linear(x, weight, bias).chunk(2, -1)``, the
  ``GEGLU`` module of the transformer feed-forward (``proj`` is ``nn.Linear(C, 2 I)``; exact erf GELU,
  torch's default), computed without materialising the ``(..., 2 I)`` projection: each program computes a
  ``BLOCK_M x BLOCK_N`` tile of the value half (``x @ W[:I].T``) and the same tile of the gate half
  (``x @ W[I:].T``) from one load of each ``x`` tile (two ``tl.dot`` into two float32 accumulators), adds
  the biases, applies ``a * gelu(gate)`` in registers and writes only the ``(..., I)`` result.
* :func:`geglu_linear_reference` -- the same maths in torch, in float32: the fallback where Triton or CUDA
  is missing (and when autograd needs a backward) and the tests' oracle.
* :func:`plan_geglu_gemm` -- the kernel's tile sizes, warps, pipeline stages and program grouping, a fixed
  rule of the problem size (no autotuning: nothing is benchmarked on the first call, so the first call can
  be captured in a CUDA graph and the variants are known to :mod:`ldm_sdk.accel.precompile`).
  :func:`geglu_linear_triton` takes a plan to override it (``bench/bench_geglu_gemm.py`` sweeps a few).

``backend="auto"`` (the default of :func:`geglu_linear`) runs the Triton kernel when ``x`` is a CUDA tensor
of dtype fp16 / bf16, the weight has ``x``'s dtype, ``C`` and ``I`` are multiples of 8, Triton imports and
no gradient is needed; otherwise the reference. ``"triton"`` always runs the kernel (errors say why it
cannot), ``"reference"`` never does. Dispatch is :func:`ldm_sdk.accel.triton_kernels._use_triton`.

Why
---
In the CUDA-graph-replayed SD-1.5 UNet step on an H100 the feed-forward is a cuBLAS GEMM writing the whole
``(M, 2 I)`` projection followed by the separate GEGLU kernel (:func:`~ldm_sdk.accel.triton_kernels.geglu`)
reading it back: at batch 16 the GEGLU pass alone costs about 1.5 ms of a 36 ms step. The projection is
the largest activation of the block (``2 I = 8 C`` values per token): after the GEMM's inputs, the unfused
path moves ``5 I`` values per token through memory (writes ``2 I``, reads ``2 I``, writes ``I``), the dual
GEMM ``I`` (it writes the result only), and it launches one kernel instead of two.

Numerics
--------
* Products are accumulated in float32 by ``tl.dot`` (fp16 / bf16 operands, float32 accumulator); the biases
  (read in their dtype) are added to the float32 accumulators, and the result
  ``(acc_a + b_a) * 0.5 g (1 + erf(g / sqrt 2))`` with ``g = acc_g + b_g`` is rounded once to ``x.dtype``.
  The unfused half-precision path rounds the projection to fp16 / bf16 before the gating and rounds again
  after it; the fused one rounds once, so it is at least as accurate.
* The float32 value differs from the float64 one by float32 accumulation error (about ``sqrt(C)`` float32
  ulps of the products' magnitude), far below one fp16 / bf16 ulp, so after rounding the kernel is within
  one output ulp of the exact result (plus a float32 noise allowance near zero, as
  :func:`~ldm_sdk.accel.triton_kernels.compare_ulps` measures). The summation order of the K loop differs
  from cuBLAS's, so the result is not bit-identical to the float32 reference.
* The reference computes ``F.linear`` in float32 (float64 for float64 inputs), then ``a * F.gelu(gate)``,
  and casts once; for float32 inputs that is exactly ``GEGLU``'s arithmetic. On CUDA its float32 GEMM
  follows torch's TF32 setting (``torch.backends.cuda.matmul.allow_tf32``, off by default): turn TF32 off
  where it serves as the accuracy oracle.

Layouts and limits
------------------
* ``x`` is ``(..., C)``; it is viewed as ``(M, C)`` (``M`` the product of the leading dims) when its strides
  allow (any row stride, unit column stride), otherwise copied once. ``weight`` is ``nn.Linear``'s
  ``(2 I, C)`` in ``x``'s dtype, read in place (row-major, K contiguous; a non-contiguous weight is copied
  once); ``bias`` is ``(2 I,)`` or None, any float dtype. The output is a contiguous ``(..., I)`` in
  ``x``'s dtype.
* The kernel needs ``C % 8 == 0`` and ``I % 8 == 0`` (16-byte aligned rows for vector loads); otherwise
  ``"auto"`` uses the reference and ``"triton"`` raises. ``M``, ``I`` and ``C`` need not be multiples of the
  tiles: loads of rows / columns past the end wrap onto valid ones (their results are not stored), the K
  tail is masked (only when ``C`` is not a multiple of ``BLOCK_K``). Row offsets are 64-bit.
* Programs are launched on a 1-D grid in grouped order (``GROUP_M`` row tiles share each column tile's
  weight slab while it is in L2). :func:`plan_geglu_gemm` picks between two tile shapes by a wave model:
  ``128 x 64`` (4 warps, 3 stages: two 128 x 64 float32 accumulators, about a 128 x 128 GEMM tile) and
  ``64 x 64`` (4 warps, 4 stages), ``BLOCK_K`` 64, aimed at the H100 (132 SMs, wgmma); the bench's sweep
  found 128 x 64 fastest where the kernel is used.
* On Hopper (compute capability 9.0+) :func:`geglu_linear_triton` runs the same products as a persistent
  kernel fed by TMA copies (:mod:`ldm_sdk.accel.geglu_tma`), faster than this pointer-addressed kernel at
  every SD-1.5 shape; a :class:`GegluGemmPlan` forces the pointer kernel, a
  :class:`~ldm_sdk.accel.geglu_tma.TmaPlan` the TMA one.
* Where it is used: :class:`~ldm_sdk.accel.fusion.FusedGEGLU` runs it only where it measured faster than
  cuBLAS + the gating kernel (:func:`geglu_linear_pays`: ``C <= 640`` with the TMA kernel, SD-1.5's two
  outer levels; ``C <= 320`` with the pointer kernel); wider, cuBLAS' GEMM is faster by about what the
  separate gating pass costs.
* The kernel has no backward: with autograd active, ``"auto"`` uses the reference (differentiable) and
  ``"triton"`` refuses. Triton runs CUDA tensors, or CPU tensors under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before Triton is imported; slow, used by the tests). Triton 3.8's interpreter
  multiplies bf16 ``tl.dot`` operands as their uint16 bit patterns, so under the interpreter only, bf16
  tiles are converted to float32 before the dot (``F32_OPERANDS``); compiled kernels never take that branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel.geglu_tma import (
    TMA_MAX_CHANNELS,
    TmaPlan,
    check_plan_fields,
    geglu_linear_tma,
    tma_device,
    tma_fits,
)
from ldm_sdk.accel.triton_kernels import (
    KERNEL_DTYPES,
    Backend,
    KernelRecorder,
    _check_kernel_input,
    _compute_dtype,
    _interpreting,
    _pow2,
    _use_triton,
    launch,
    triton,
)

GEMM_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Input dtypes the dual-GEMM kernel takes (``tl.dot`` on fp16 / bf16 tensor cores)."""
ALIGN = 8
"""``C`` and ``I`` must be multiples of this (16-byte rows of fp16 / bf16)."""
H100_SMS = 132
"""Streaming multiprocessors :func:`plan_geglu_gemm` plans for when not told (H100 / H200 SXM)."""

# (BLOCK_M, BLOCK_N, num_warps, num_stages, relative throughput of a program of that tile), largest first:
# the wave model of plan_geglu_gemm charges each wave of programs its tile's work over its throughput.
# Measured on an H100 (bench/results/geglu_gemm_h100.json): 128 x 64 with 4 warps and 3 stages was the
# fastest plan at both SD-1.5 shapes where the dual GEMM beats cuBLAS + the gating kernel (C = 320).
TILE_SHAPES: tuple[tuple[int, int, int, int, float], ...] = (
    (128, 64, 4, 3, 1.0),
    (64, 64, 4, 4, 0.75),
)
DUAL_GEMM_MAX_CHANNELS = 320
"""Widest input (``C``) where :func:`geglu_linear_pays`: the GEMM has so little K that writing its
``(M, 2 I)`` output dominates, and the dual GEMM, which writes ``(M, I)`` once, wins. H100, fp16, graph
replayed (``bench/bench_geglu_gemm.py``): C = 320 at M = 8192: 46.4 us vs 55.0 us for cuBLAS + the gating
kernel; at M = 65536: 363 vs 394 us. With more K cuBLAS' GEMM is the faster one by more than the gating
pass costs (C = 1280, M = 512: 38.2 vs 30.9 us), and at C = 640 the two are within 3 %."""
BLOCK_K = 64
GROUP_M = 8


# -- argument checks ---------------------------------------------------------------------------------------
def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _check_geglu_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point tensor (..., C), got {_describe(x)}")
    channels = x.shape[-1]
    if (
        not isinstance(weight, Tensor)
        or not weight.is_floating_point()
        or weight.dim() != 2
        or weight.shape[1] != channels
        or weight.shape[0] % 2
    ):
        raise ValueError(
            f"weight must be a floating-point (2 * inner, C) tensor with C = {channels} (x's last dim) and "
            f"an even number of rows (GEGLU's proj.weight: value rows, then gate rows), got "
            f"{_describe(weight)}"
        )
    rows = weight.shape[0]
    if bias is not None and (
        not isinstance(bias, Tensor)
        or not bias.is_floating_point()
        or bias.dim() != 1
        or bias.numel() != rows
    ):
        raise ValueError(
            f"bias must be None or a 1-D floating-point tensor of {rows} values (2 * inner), got "
            f"{_describe(bias)}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}: move the module to x's device")


def _kernel_unfit(x: Tensor, weight: Tensor) -> str | None:
    """Why the kernel cannot take these (checked) arguments, or None when it can."""
    if x.dtype not in GEMM_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in GEMM_DTYPES)
        return f"takes {valid} inputs, got {str(x.dtype).removeprefix('torch.')}"
    if weight.dtype != x.dtype:
        return (
            f"needs the weight in x's dtype ({str(x.dtype).removeprefix('torch.')}), got "
            f"{str(weight.dtype).removeprefix('torch.')}"
        )
    channels, inner = x.shape[-1], weight.shape[0] // 2
    if channels % ALIGN or inner % ALIGN:
        return f"needs C and inner to be multiples of {ALIGN}, got C={channels}, inner={inner}"
    return None


# -- reference (float32 maths, one rounding) -----------------------------------------------------------------
def geglu_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``a * gelu(gate)`` for ``a, gate = F.linear(x, weight, bias).chunk(2, -1)`` computed in float32
    (float64 for float64 ``x``), cast to ``x.dtype`` once; differentiable. For float32 this is exactly
    ``GEGLU``'s arithmetic (the same torch calls in the same order)."""
    _check_geglu_linear(x, weight, bias)
    ct = _compute_dtype(x.dtype)
    h = F.linear(x.to(ct), weight.to(ct), bias.to(ct) if bias is not None else None)
    a, gate = h.chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(x.dtype)


# -- launch plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GegluGemmPlan:
    """How :func:`geglu_linear_triton` launches: output tile ``block_m x block_n`` (of each half), K step
    ``block_k``, ``group_m`` row tiles per group of the grouped program order, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = GROUP_M

    def __post_init__(self) -> None:
        check_plan_fields(self, ("num_stages", "group_m"))
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")

    def programs(self, m: int, inner: int) -> int:
        """Programs of the launch for ``m`` rows and ``inner`` output columns."""
        return math.ceil(m / self.block_m) * math.ceil(inner / self.block_n)

    def label(self) -> str:
        """``BMxBNxBK_wW_sS_gG``, for tables."""
        tile = f"{self.block_m}x{self.block_n}x{self.block_k}"
        return f"{tile}_w{self.num_warps}_s{self.num_stages}_g{self.group_m}"


def plan_geglu_gemm(m: int, inner: int, k: int, *, sms: int = H100_SMS) -> GegluGemmPlan:
    """The launch plan for ``m`` rows, ``inner`` output columns (``I``) and ``k`` input channels (``C``).

    Among :data:`TILE_SHAPES` (each clamped to the problem: ``BLOCK_M <= next_pow2(m)``,
    ``BLOCK_N <= next_pow2(inner)``, >= 16), pick the one with the least modelled time
    ``ceil(programs / sms) * BLOCK_M * BLOCK_N / throughput`` -- whole waves of programs, each wave as long
    as one tile's work -- the larger tile on ties. Big problems keep the large tile (many waves, the tail
    wave matters little); problems of one to a few waves take the smaller tiles that fill the waves
    (SD-1.5's ``I = 5120`` level at batch 2: 160 large tiles would leave 2 waves 61 % full). ``BLOCK_K`` is
    64 (``next_pow2(k)`` >= 16 below that). ``sms``: the SM count (132 on an H100 / H200)."""
    for name, value in (("m", m), ("inner", inner), ("k", k), ("sms", sms)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "sms" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'sms' else 0}, got {value!r}")
    block_k = min(BLOCK_K, max(16, _pow2(k)))
    best: tuple[float, GegluGemmPlan] | None = None
    for block_m, block_n, warps, stages, throughput in TILE_SHAPES:
        plan = GegluGemmPlan(
            block_m=min(block_m, max(16, _pow2(m))),
            block_n=min(block_n, max(16, _pow2(inner))),
            block_k=block_k,
            num_warps=warps,
            num_stages=stages,
        )
        waves = max(1, math.ceil(plan.programs(m, inner) / sms))
        cost = waves * plan.block_m * plan.block_n / throughput
        if best is None or cost < best[0]:
            best = (cost, plan)
    assert best is not None
    return best[1]


def _sm_count(x: Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return H100_SMS  # the interpreter: plan as for the GPU the kernel is meant for


# -- dispatch ------------------------------------------------------------------------------------------------
def geglu_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """GEGLU's projection + gating, ``a * gelu(gate)`` of ``F.linear(x, weight, bias)`` (``(..., C)`` ->
    ``(..., inner)``, see the module doc); ``backend`` picks the Triton dual GEMM or the reference."""
    _check_geglu_linear(x, weight, bias)
    if _use_triton(backend, "geglu_linear", x, weight, bias) and (
        backend == "triton" or _kernel_unfit(x, weight) is None
    ):
        return geglu_linear_triton(x, weight, bias, recorder=recorder)
    return geglu_linear_reference(x, weight, bias)


def geglu_linear_pays(x: Tensor, weight: Tensor, bias: Tensor | None, backend: Backend = "auto") -> bool:
    """Whether :func:`geglu_linear` with ``backend`` would run the Triton dual GEMM for these arguments and
    it beats cuBLAS + the separate gating kernel there (measured: ``C <=``
    :data:`~ldm_sdk.accel.geglu_tma.TMA_MAX_CHANNELS` where the TMA kernel runs, else ``C <=``
    :data:`DUAL_GEMM_MAX_CHANNELS`); callers with that unfused path take it otherwise
    (:class:`~ldm_sdk.accel.fusion.FusedGEGLU`)."""
    widest = TMA_MAX_CHANNELS if tma_device(x.device) else DUAL_GEMM_MAX_CHANNELS
    return (
        x.shape[-1] <= widest
        and _use_triton(backend, "geglu_linear", x, weight, bias)
        and _kernel_unfit(x, weight) is None
    )


# -- torch-facing kernel call --------------------------------------------------------------------------------
def geglu_linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    plan: GegluGemmPlan | TmaPlan | None = None,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`geglu_linear` through the Triton dual GEMM: the TMA kernel of :mod:`ldm_sdk.accel.geglu_tma`
    where it runs (:func:`~ldm_sdk.accel.geglu_tma.tma_fits`), else the pointer-addressed one. ``plan``
    overrides the choice and :func:`plan_geglu_gemm` / :func:`~ldm_sdk.accel.geglu_tma.plan_tma` (the
    result does not depend on it beyond the float32 summation order)."""
    _check_geglu_linear(x, weight, bias)
    unfit = _kernel_unfit(x, weight)
    if unfit is not None:
        raise ValueError(f"the Triton geglu_linear kernel {unfit}; use backend='auto' or 'reference'")
    if plan is not None and not isinstance(plan, GegluGemmPlan | TmaPlan):
        raise ValueError(f"plan must be None, a GegluGemmPlan or a TmaPlan, got {type(plan).__name__}")
    _check_kernel_input(x, "geglu_linear")
    channels = x.shape[-1]
    inner = weight.shape[0] // 2
    lead = x.shape[:-1]
    x2 = x.reshape(-1, channels)  # a view when the strides allow
    if x2.stride(1) != 1 and channels > 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, inner), device=x.device, dtype=x.dtype)
    if rows == 0 or inner == 0:
        return y.reshape(*lead, inner)
    w = weight.contiguous()  # nn.Linear weights are: no copy
    b = w  # a dummy pointer when absent
    if bias is not None:  # read in its dtype, converted to float32 in the kernel
        b = (bias if bias.dtype in KERNEL_DTYPES else bias.float()).contiguous()
    if isinstance(plan, TmaPlan) or (plan is None and tma_fits(x2, w)):
        geglu_linear_tma(x2, w, b if bias is not None else None, y, plan=plan, recorder=recorder)
        return y.reshape(*lead, inner)
    if plan is None:
        plan = plan_geglu_gemm(rows, inner, channels, sms=_sm_count(x))
    grid = (plan.programs(rows, inner),)
    launch(
        _geglu_gemm_kernel,
        grid,
        recorder,
        x2,
        w,
        b,
        y,
        rows,
        inner,
        channels,
        x2.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=channels % plan.block_k == 0,
        F32_OPERANDS=_interpreting() and x.dtype == torch.bfloat16,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        GROUP_M=plan.group_m,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return y.reshape(*lead, inner)


# -- kernel --------------------------------------------------------------------------------------------------
if triton is not None:
    from ldm_sdk.kernels.geglu_gemm import (
        _geglu_gemm_kernel,
    )


__all__ = [
    "ALIGN",
    "DUAL_GEMM_MAX_CHANNELS",
    "GEMM_DTYPES",
    "H100_SMS",
    "TILE_SHAPES",
    "GegluGemmPlan",
    "geglu_linear",
    "geglu_linear_pays",
    "geglu_linear_reference",
    "geglu_linear_triton",
    "plan_geglu_gemm",
]
