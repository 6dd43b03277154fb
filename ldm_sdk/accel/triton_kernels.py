"""Fused GroupNorm (+ SiLU) and GEGLU as Triton kernels, with pure-torch references.

What
----
* :func:`group_norm_act` -- ``act(group_norm(x) * weight + bias)`` with ``act`` in ``"none"`` / ``"silu"``:
  what ``GroupNorm32`` + ``nn.SiLU`` (UNet) and ``nn.GroupNorm`` + ``nonlinearity`` (first stage) compute,
  in two kernels (statistics, then normalise-affine-activation) instead of ~5 (casts, norm, SiLU).
* ``shift=`` (optional, ``(N, C)``): ``act(group_norm(x + shift[:, :, None, ...]) * weight + bias)``, a
  per-(sample, channel) value added to the input before the statistics. A ResBlock's ``in_layers`` conv
  bias plus its timestep embedding ``emb_layers(emb)`` is such a value, so the conv can run without bias
  and the ``h + emb_out[..., None, None]`` add and the bias add are folded into the following norm: two
  elementwise passes over the activation fewer.
* :func:`geglu` -- ``a * gelu(gate)`` for ``a, gate = h.chunk(2, -1)`` (the GEGLU feed-forward of the
  transformer blocks; exact erf GELU, torch's default) in one kernel instead of three.
* :func:`group_norm_act_reference` / :func:`geglu_reference` -- the same maths in torch, in float32: the
  fallback where Triton or CUDA is missing (and when autograd needs a backward) and the tests' oracle.

``backend="auto"`` (the default of the dispatching functions) runs the Triton kernel when the input is a
CUDA tensor of dtype fp16 / bf16 / fp32, Triton imports and no gradient is needed; otherwise the reference.
``"triton"`` always runs the kernel (errors say why it cannot), ``"reference"`` never does.

Why
---
On an H100 the CUDA-graph-replayed SD-1.5 UNet step is dominated by elementwise and GroupNorm kernels;
each GroupNorm32 + SiLU reads / writes the activation about five times (cast up, stats, normalise, cast
down, SiLU). The fused op reads it twice and writes it once.

Numerics
--------
* Everything is computed in float32 (``float64`` inputs are computed in float64 by the reference and are
  not taken by the kernels), and the result is rounded once to the input dtype. GroupNorm32's float32
  round trip is therefore kept (the unfused path rounds twice in half precision: after the norm and after
  the SiLU; the fused one rounds once, so it is at least as accurate).
* ``shift`` (any floating dtype) is read in float32 (float64 by the reference for float64 ``x``) and
  ``x + shift`` is formed in float32 where ``x`` is read (statistics and apply pass alike; the
  channels_last kernels use that the shift is constant per column: it is added to the column means of the
  statistics and folded into the subtrahend, ``x - (mean - shift)``, of the apply pass): the sum is
  never rounded to ``x.dtype``, so the result is still rounded once. Without ``shift`` the kernels are
  the same as before (a constexpr ``HAS_SHIFT`` flag; bit-identical results).
* Statistics, contiguous layout: each program keeps a per-lane Welford state (count, mean, M2) over its
  chunk of a group, combines its lanes with the parallel (Chan et al.) formula
  ``M2 = sum M2_i + sum n_i (mean_i - mean)^2``, and the apply pass merges the chunks of a group the same
  way. channels_last: each program sums, per lane in float32, ``d = x - pivot`` and ``d^2`` over its
  chunk of a column tile, the pivot being each column's mean over the chunk's first tile (so the sums
  hold deviations, whatever the column's offset -- a channel mean, a ``shift`` -- and
  ``M2 = sum d^2 - (sum d)^2 / rows`` cancels little: at most ``rows / tile rows`` of relative precision
  even for an outlier in the first tile, about none for ordinary data); columns, the group's columns of a
  tile, then the tiles and chunks are merged by Chan's formula. No sum / sum-of-squares in low precision
  and none of raw (un-pivoted) values.
  Variance is the biased one (divide by the group size), as ``torch.nn.functional.group_norm``.
* Normalisation is ``(x - mean) * (rstd * w) + b`` (no ``x * scale + offset`` cancellation); SiLU is
  ``y / (1 + exp(-y))`` (channels_last two-pass: the divide is the full-range approximate float32 one,
  within 2 float32 ulps, far below the output's rounding); GELU is ``0.5 g (1 + erf(g / sqrt 2))``. The
  float32 results differ from torch's float32 ones by a few float32 ulps, so after rounding to fp16 /
  bf16 they are equal or one output ulp apart (values within ~1e-4 of zero after a cancellation can
  differ by a few float32 ulps in absolute terms, which may be more than one ulp of such a tiny output).

Layouts and sizes
-----------------
``x`` is ``(N, C, *spatial)`` with ``C`` divisible by ``num_groups``. NCHW-contiguous (any number of spatial
dims, 3-D ``(N, C, T)`` included) and 4-D channels_last inputs are read in place and the output has the
input's memory format; any other strided input is made contiguous first (one copy). Offsets are 64-bit, so
tensors above 2**31 elements are fine. A group may hold up to 2**34 elements.

Kernel configurations (fixed, no autotuning, so the first call compiles each variant once; size arguments
that only index -- group counts, splits -- are not specialised by Triton, to keep the variants few):

* statistics, contiguous layout: a grid of ``(N * groups, split)``; each program walks a chunk of its group
  in tiles of ``BLOCK`` (<= 2048 elements). ``split`` is chosen so that about ``4 x (number of SMs)``
  programs run -- batch 2 x 32 groups is only 64 groups, too few for 132 SMs -- without making chunks
  shorter than one tile.
* apply, contiguous layout: a grid of ``(N * C, split)`` over the channels' spatial runs (one weight and
  bias per program, no per-element channel division).
* channels_last (both passes): a grid of ``(N * ceil(C / BLOCK_C), split)``; each program walks a chunk of
  pixel rows of one column tile in ``BLOCK_S x BLOCK_C`` tiles (<= 4096 elements, 8 warps),
  ``BLOCK_C`` contiguous channels per pixel (128-bit loads and stores), the row loop software-pipelined
  (``tl.range(num_stages=3)``). ``BLOCK_C`` is a power of two >= ``C / groups``, 64 (128 bytes of fp16
  per row) unless that pads ``C`` by more than 1/8 (then down to 32), so a tile touches few groups and a
  group spans one tile (``C / groups`` divides ``BLOCK_C``) or at most two. The statistics program reduces
  per column, then per group of the tile (Chan), and writes one partial (mean, M2, count) per (group,
  part, chunk), part = which of the group's (at most two) tiles; the apply program merges the partials of
  the groups its tile touches and normalises with per-column scale / offset, walking the chunks last to
  first (its first programs re-read what the statistics pass read last, from L2). Narrow column tiles
  keep that merge small (it grows with the groups per tile times ``split``). On an H100 (SD-1.5 UNet
  norms at batch 16, fp16) these tiles, the pipelining, the pivoted sums and the reversed walk took the
  two-pass norm from ~73 % to ~83 % of the HBM bandwidth at the 64 x 64 maps.
* GEGLU: ``(rows / BLOCK_R, inner / BLOCK_C)`` tiles of about 2048 outputs, ``BLOCK_C`` picked among
  128..1024 to waste at most 1/8 of a row (SD-1.5's inner widths 1280 / 2560 / 5120 give 256 / 512 / 1024).

Limits
------
The kernels have no backward: with autograd active, ``"auto"`` uses the reference (differentiable) and
``"triton"`` refuses. Triton runs CUDA tensors, or CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported; slow, used by the tests).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: the reference ops and the rest of the SDK need no Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch's CUDA wheels
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
try:  # Triton >= 3.4: host-side descriptors of the TMA kernels (ldm_sdk.accel.geglu_tma)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older or no Triton: the pointer kernels serve
    TensorDescriptor = None  # type: ignore[assignment,misc]

Act = Literal["none", "silu"]
ACTIVATIONS: tuple[str, ...] = get_args(Act)
Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

MAX_BLOCK = 2048  # elements per tile (fp16: 16 per thread at 4 warps)
MAX_SPLIT = 1024  # chunks per group in the statistics pass (merged by one vector load)
MAX_CHUNK = 2**24  # elements per chunk: counts stay exact in float32
PROGRAMS_PER_SM = 4
SINGLE_PASS_MAX = 16384  # padded group tile (positions x channels) one program normalises in registers


# -- references (float32 maths, one rounding) ----------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (never less precise than the input)."""
    return torch.promote_types(dtype, torch.float32)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def group_norm_act_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    act: Act = "none",
    *,
    shift: Tensor | None = None,
) -> Tensor:
    """``act(F.group_norm(x + shift[:, :, None, ...], ...))`` computed in float32 (float64 for float64
    ``x``), cast to ``x.dtype`` once, in ``x``'s memory format; ``shift`` (``(N, C)``, optional) is cast to
    the compute dtype and added there (the sum is not rounded to ``x.dtype``). Without ``shift``, for
    float32 inputs this is exactly ``GroupNorm32`` followed by ``nn.SiLU`` (the same torch calls in the
    same order)."""
    _check_group_norm(x, weight, bias, num_groups, eps, act, shift)
    ct = _compute_dtype(x.dtype)
    w = weight.to(ct) if weight is not None else None
    b = bias.to(ct) if bias is not None else None
    xf = x.to(ct)
    if shift is not None:
        xf = xf + shift.to(ct).reshape(*shift.shape, *(1,) * (x.dim() - 2))
    y = F.group_norm(xf, num_groups, w, b, eps)
    if act == "silu":
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def geglu_reference(h: Tensor) -> Tensor:
    """``a * gelu(gate)`` for ``a, gate = h.chunk(2, -1)`` (exact erf GELU) computed in float32 (float64
    for float64 ``h``), cast to ``h.dtype`` once. For float32 this is exactly ``GEGLU``'s arithmetic."""
    _check_geglu(h)
    a, gate = h.to(_compute_dtype(h.dtype)).chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)


# -- accuracy measure (tests, bench/validate_kernels.py) ---------------------------------------------------
FLOAT32_NOISE = 2.0**-19
"""Relative size (to the largest reference value) of the float32 evaluation differences allowed on top of
one output ulp: two float32 evaluations of the same formula differ by a few float32 ulps of the operands."""


def output_ulp(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` numbers at each of ``values`` (float64; the subnormal spacing near 0)."""
    info = torch.finfo(dtype)
    v = values.double().abs()
    _, exponent = torch.frexp(v)
    spacing = torch.ldexp(torch.ones_like(v), exponent - 1).clamp_min(info.tiny)
    return torch.where(v == 0, torch.full_like(v, info.tiny), spacing) * info.eps


@dataclass(frozen=True)
class UlpReport:
    """``out`` against ``ref`` in ulps of ``out``'s dtype at ``ref``: the largest distance, the fraction of
    elements more than one ulp apart, and whether every element is within one ulp plus ``noise``."""

    max_ulps: float
    frac_over_1ulp: float
    max_abs: float
    noise: float
    within_bound: bool

    def ok(self, max_frac_over_1ulp: float = 1e-4) -> bool:
        """Every element within 1 ulp + noise, and at most ``max_frac_over_1ulp`` of them beyond 1 ulp."""
        return self.within_bound and self.frac_over_1ulp <= max_frac_over_1ulp

    def __str__(self) -> str:
        flag = "" if self.within_bound else " OUT OF BOUND"
        return (
            f"max {self.max_ulps:.3g} ulp, {self.frac_over_1ulp:.2e} of elements > 1 ulp, max |diff| "
            f"{self.max_abs:.3e} (noise allowance {self.noise:.2e}){flag}"
        )


def compare_ulps(out: Tensor, ref: Tensor, *, noise: float = FLOAT32_NOISE) -> UlpReport:
    """Measure ``out`` (fp16 / bf16 / fp32) against ``ref`` (any precision) in ulps of ``out.dtype``. The
    bound: ``|out - ref| <= ulp(ref) + noise * max|ref|`` everywhere."""
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}")
    diff = (out.double() - ref.double()).abs()
    ulp = output_ulp(ref, out.dtype)
    ulps = diff / ulp
    allowance = noise * float(ref.double().abs().max()) if ref.numel() else 0.0
    return UlpReport(
        max_ulps=float(ulps.max()) if ulps.numel() else 0.0,
        frac_over_1ulp=float((ulps > 1).double().mean()) if ulps.numel() else 0.0,
        max_abs=float(diff.max()) if diff.numel() else 0.0,
        noise=allowance,
        within_bound=bool((diff <= ulp + allowance).all()),
    )


# -- launching (and recording launches for the parallel pre-compilation) -----------------------------------
@dataclass(frozen=True)
class Launch:
    """One Triton launch: the JIT kernel, its grid, its arguments."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class TensorStandIn:
    """What Triton's specialisation reads of a tensor argument -- its dtype, device and address (the
    alignment) -- without keeping the tensor's memory alive."""

    __slots__ = ("_ptr", "device", "dtype")

    def __init__(self, tensor: Tensor) -> None:
        self.dtype = tensor.dtype
        self.device = tensor.device
        self._ptr = tensor.data_ptr()

    def data_ptr(self) -> int:
        return self._ptr


def stand_in(value: Any) -> Any:
    """``value`` with its tensor (a TMA descriptor's base tensor) replaced by a :class:`TensorStandIn`."""
    if isinstance(value, Tensor):
        return TensorStandIn(value)
    is_descriptor = TensorDescriptor is not None and isinstance(value, TensorDescriptor)
    if is_descriptor and isinstance(value.base, Tensor):
        return dataclasses.replace(value, base=TensorStandIn(value.base))
    return value


def stand_ins(launch: Launch) -> Launch:
    """``launch`` with every tensor argument replaced by a :class:`TensorStandIn` (see :func:`stand_in`):
    enough to compile its variant, nothing to run it with."""
    return Launch(
        launch.kernel,
        launch.grid,
        tuple(stand_in(a) for a in launch.args),
        {k: stand_in(v) for k, v in launch.kwargs.items()},
    )


class KernelRecorder:
    """Collects the Triton launches of a call instead of making them: :mod:`ldm_sdk.accel.precompile` runs
    a model's first call once in this mode (outputs are left unwritten) and compiles the recorded kernel
    variants in parallel, so the real first call finds them compiled.

    ``keep_tensors=False`` records :func:`stand_ins`: the call's tensors are freed as it goes, as in a
    plain call (kept, every activation a kernel touched stays alive to the end of the call: 9.4 GB more
    than the model for SD-1.5's guided step at batch 8, ``bench/capture_memory.py``). Keep them to launch
    the recorded kernels later (``bench/kernel_times.py``)."""

    def __init__(self, *, keep_tensors: bool = True) -> None:
        self.keep_tensors = keep_tensors
        self.launches: list[Launch] = []

    def __len__(self) -> int:
        return len(self.launches)

    def add(self, launch: Launch) -> None:
        self.launches.append(launch if self.keep_tensors else stand_ins(launch))


def launch(
    kernel: Any, grid: tuple[int, ...], recorder: KernelRecorder | None, *args: Any, **kwargs: Any
) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it in ``recorder`` when one is given."""
    if recorder is None:
        kernel[grid](*args, **kwargs)
    else:
        recorder.add(Launch(kernel, tuple(grid), args, kwargs))


# -- dispatch ------------------------------------------------------------------------------------------------
def triton_available() -> bool:
    """Whether Triton imported (the kernels can be built)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_triton(backend: str, what: str, x: Tensor, *others: Tensor | None) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "reference":
        return False
    if backend == "auto":
        return x.is_cuda and triton is not None and x.dtype in KERNEL_DTYPES and not _needs_grad(x, *others)
    if _needs_grad(x, *others):
        raise RuntimeError(
            f"the Triton {what} kernel has no backward, but autograd is recording: run it under "
            "torch.no_grad() / torch.inference_mode(), or use backend='auto' (which falls back to the "
            "differentiable reference) or backend='reference'"
        )
    return True


def group_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    act: Act = "none",
    *,
    shift: Tensor | None = None,
    stats: GroupNormStats | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """Fused GroupNorm + optional SiLU (see the module doc): ``act(group_norm(x + shift[:, :, None, ...]) *
    weight + bias)``, ``shift`` an optional ``(N, C)`` tensor added in float32 before the statistics;
    ``backend`` picks Triton or the reference. ``stats``: ``x``'s statistics partials, produced by the
    kernel that wrote ``x`` (the Triton path uses them instead of its statistics pass; the reference
    computes its own)."""
    if _use_triton(backend, "group_norm_act", x, weight, bias, shift):
        return group_norm_act_triton(
            x, weight, bias, num_groups, eps, act, shift=shift, stats=stats, recorder=recorder
        )
    return group_norm_act_reference(x, weight, bias, num_groups, eps, act, shift=shift)


def geglu(h: Tensor, *, backend: Backend = "auto", recorder: KernelRecorder | None = None) -> Tensor:
    """Fused ``a * gelu(gate)`` of a GEGLU projection output ``h`` (``(..., 2 * inner)``)."""
    if _use_triton(backend, "geglu", h):
        return geglu_triton(h, recorder=recorder)
    return geglu_reference(h)


# -- argument checks ---------------------------------------------------------------------------------------
def _check_group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    act: str,
    shift: Tensor | None = None,
) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor (N, C, *spatial), got a {got}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(
            f"x has {channels} channels, not divisible by num_groups={num_groups}; GroupNorm needs "
            "C % num_groups == 0"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (not isinstance(p, Tensor) or p.numel() != channels or p.dim() != 1):
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"{name} must be None or a 1-D tensor of {channels} values (C), got {shape}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}")
    if shift is not None:
        _check_shift(x, shift)


def _check_shift(x: Tensor, shift: Tensor) -> None:
    """``shift``: a floating-point ``(N, C)`` tensor on ``x``'s device."""
    n, c = x.shape[0], x.shape[1]
    if not isinstance(shift, Tensor):
        raise ValueError(
            f"shift must be None or a floating-point tensor of shape (N, C) = ({n}, {c}), got a "
            f"{type(shift).__name__}"
        )
    if tuple(shift.shape) != (n, c):
        raise ValueError(
            f"shift must be None or a tensor of shape (N, C) = ({n}, {c}) (one value per sample and "
            f"channel of x), got shape {tuple(shift.shape)}"
        )
    if not shift.is_floating_point():
        raise ValueError(f"shift must be a floating-point tensor (any float dtype), got {shift.dtype}")
    if shift.device != x.device:
        raise ValueError(f"shift is on {shift.device} but x is on {x.device}: shift must be on x's device")


def _check_geglu(h: Tensor) -> None:
    if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() < 1 or h.shape[-1] % 2:
        got = f"{h.dtype} tensor of shape {tuple(h.shape)}" if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(
            f"geglu takes the projection output (..., 2 * inner): a floating-point tensor with an even last "
            f"dimension, got a {got}"
        )


def _check_kernel_input(x: Tensor, what: str) -> None:
    if x.dtype not in KERNEL_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        raise ValueError(f"the Triton {what} kernel takes {valid}, got {x.dtype}; use backend='reference'")
    if triton is None:
        raise RuntimeError(f"the Triton {what} kernel needs triton, which is not installed")
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            f"the Triton {what} kernel runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), but the "
            f"input is on {x.device}; use backend='auto' or 'reference'"
        )


# -- launch plans ----------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _warps(block: int) -> int:
    return min(8, max(1, block // 512))


@dataclass(frozen=True)
class Chunking:
    """``units`` (elements or rows) cut into ``split`` chunks of ``chunk`` units (a multiple of ``tile``)."""

    tile: int
    chunk: int
    split: int


def _chunking(units: int, tile: int, parallel: int, target: int, max_split: int, unit_size: int) -> Chunking:
    """Chunks of whole tiles so that ``parallel * split`` reaches about ``target`` programs, without chunks
    shorter than a tile, more than ``max_split`` of them, or more than ``MAX_CHUNK`` elements in one."""
    tiles = max(1, math.ceil(units / tile))
    split = min(tiles, max(1, math.ceil(target / max(1, parallel))), max_split)
    per_chunk = math.ceil(tiles / split)
    per_chunk = min(per_chunk, max(1, MAX_CHUNK // (tile * unit_size)))
    split = math.ceil(tiles / per_chunk)
    if split > max_split:
        raise ValueError(
            f"a group of {units * unit_size} elements is too large for the fused GroupNorm (at most "
            f"{max_split * MAX_CHUNK} elements per group); use backend='reference'"
        )
    return Chunking(tile, per_chunk * tile, split)


@dataclass(frozen=True)
class NhwcTiles:
    """The channels_last two-pass kernels' tiling: at most ``max_block`` elements per tile, ``cols``
    columns aimed for (narrowed by :func:`_nhwc_block_c`), ``stages`` loads in flight in the row loops;
    ``stats_warps`` / ``apply_warps`` the two kernels' warps (0: 512 elements of the tile each)."""

    max_block: int
    cols: int
    stages: int
    stats_warps: int = 0
    apply_warps: int = 0


NHWC_PLAIN = NhwcTiles(max_block=4096, cols=32, stages=1, stats_warps=4, apply_warps=4)
"""Batches below :data:`NHWC_PIPELINE_MIN_BATCH`: 128 x 32 tiles on 4 warps in both kernels, plain row
loops: 32 elements per thread and load (a row loop waits on each load, so more bytes per load are more
bytes in flight). H100, fp16, against 64 x 32 tiles on 4 warps: the two kernels' GPU time over the kl-f8
decoder's norms of one 512 px decode 1452 -> 1242 us (``bench/gn_kernel_split.py``,
``bench/results/gn_split_h100.json``, configurations ``c32_b2048_w4_sm4`` / ``c32_b4096_w4_sm4``); graph
replay, same machine: the decode 5.44 -> 5.24 ms, the SD-1.5 step at batch 2 5.887 -> 5.853 ms."""
NHWC_PIPELINED = NhwcTiles(max_block=2048, cols=32, stages=3)
"""From batch :data:`NHWC_PIPELINE_MIN_BATCH`: the same tiles, 3 loads in flight in the row loops. H100,
fp16, sum over the norms of one SD-1.5 UNet step (``bench/gn_variants.py``,
``bench/results/gn_variants_*_h100.json``): at batch 16, 2.21 ms pipelined vs 2.52 plain (and 2.40 for
64 x 64 tiles on 8 warps, 2.87 for the kernels before the sum-of-squares statistics); at batch 2, 0.559 vs
0.549; the kl-f8 decoder's norms at 512 px, 1.26 vs 1.15 ms."""
NHWC_PIPELINE_MIN_BATCH = 8
"""Batch from which :func:`plan_group_norm` takes :data:`NHWC_PIPELINED` (measured at 1, 2 and 16)."""
NHWC_FLOOR_COLS = 32  # column tiles are narrowed down to this (64 bytes) where they would pad C by > 1/8


@dataclass(frozen=True)
class GroupNormPlan:
    """How :func:`group_norm_act_triton` launches for one input: layout, tiles, chunks and warps."""

    channels_last: bool
    n: int
    c: int
    s: int  # spatial size (product of the spatial dims)
    groups: int
    block: int  # contiguous layout: statistics tile (elements)
    block_s: int  # channels_last: tile rows
    block_c: int  # channels_last: tile columns (>= C / groups)
    stats: Chunking  # contiguous: over the group's elements; channels_last: over its rows
    apply: Chunking  # contiguous: over one channel's spatial run; channels_last: as stats
    apply_block: int  # contiguous layout: apply tile (elements)
    num_warps: int
    apply_warps: int
    block_g: int = 0  # channels_last: groups a column tile can touch (a power of two)
    parts: int = 1  # channels_last: column tiles a group can span (1: tiles hold whole groups; else 2)
    stages: int = 1  # channels_last: loads in flight in the row loops

    @property
    def group_size(self) -> int:
        return (self.c // self.groups) * self.s


@dataclass(frozen=True, eq=False)
class GroupNormStats:
    """The channels_last statistics pass's output for one map: per (sample, group, part, chunk) partial
    means, M2 sums and counts (float32) under ``plan``. A kernel that writes the map can produce them on the
    way (:func:`ldm_sdk.accel.norm_handoff.bias_residual_add_with_stats`); :func:`group_norm_act_triton`
    then skips its own statistics pass (``stats=``)."""

    plan: GroupNormPlan
    mean: Tensor
    m2: Tensor
    count: Tensor


def plan_group_norm(
    shape: tuple[int, ...],
    num_groups: int,
    *,
    channels_last: bool,
    target_programs: int,
    max_block: int | None = None,
    nhwc: NhwcTiles | None = None,
) -> GroupNormPlan:
    """The launch plan for an ``(N, C, *spatial)`` input (see the module doc). ``target_programs``: the
    parallelism to aim for (the kernels use 4 x the SM count); ``nhwc``: the channels_last tiling
    (default: :data:`NHWC_PIPELINED` from batch :data:`NHWC_PIPELINE_MIN_BATCH`, else
    :data:`NHWC_PLAIN`);
    ``max_block``: the largest tile (a power of two; default ``MAX_BLOCK``, channels_last the tiling's;
    smaller values exercise the chunk loops in tests)."""
    if nhwc is None:
        nhwc = NHWC_PIPELINED if shape[0] >= NHWC_PIPELINE_MIN_BATCH else NHWC_PLAIN
    if max_block is None:
        max_block = nhwc.max_block if channels_last else MAX_BLOCK
    if max_block < 16 or max_block & (max_block - 1):
        raise ValueError(f"max_block must be a power of two >= 16, got {max_block}")
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    cg = c // num_groups
    groups_total = n * num_groups
    if channels_last:
        block_c = _nhwc_block_c(c, cg, nhwc.cols)
        tiles = math.ceil(c / block_c)
        parts = 1 if block_c % cg == 0 else 2
        block_g = _pow2(block_c // cg) if parts == 1 else _pow2((block_c - 1) // cg + 2)
        block_s = max(1, min(max_block // block_c, _pow2(s)))
        stats = _chunking(s, block_s, n * tiles, target_programs, MAX_SPLIT // parts, min(cg, block_c))
        warps = _warps(block_s * block_c)
        stats_warps = nhwc.stats_warps or warps
        apply_warps = nhwc.apply_warps or warps
        return GroupNormPlan(
            True,
            n,
            c,
            s,
            num_groups,
            0,
            block_s,
            block_c,
            stats,
            stats,
            0,
            stats_warps,
            apply_warps,
            block_g,
            parts,
            nhwc.stages,
        )
    length = cg * s
    block = max(16, min(max_block, _pow2(length)))
    stats = _chunking(length, block, groups_total, target_programs, MAX_SPLIT, 1)
    apply_block = max(16, min(max_block, _pow2(s)))
    apply = _chunking(s, apply_block, n * c, target_programs, 65535, 1)
    return GroupNormPlan(
        False, n, c, s, num_groups, block, 0, 0, stats, apply, apply_block, _warps(block), _warps(apply_block)
    )


def _nhwc_block_c(c: int, cg: int, cols: int) -> int:
    """channels_last column tile: a power of two >= the group size (so a group spans at most two tiles),
    ``cols`` wide (at most ``C`` rounded up), halved while the last tile would pad ``C`` by more than 1/8
    but not below ``NHWC_FLOOR_COLS`` (whole DRAM sectors per pixel row) or the group size. On an H100 at
    batch 16, 64 columns x 64 rows at 8 warps beat 32 x 64 at 4 warps and 128-column tiles; narrow tiles
    also keep the groups per tile, hence the partials each apply program merges, few; narrowness costs no
    coalescing, since each tile row is whole 32-byte sectors either way (neighbouring
    column tiles, the adjacent programs of the grid, read the rest of the pixel row at about the same
    time)."""
    floor = max(_pow2(cg), min(NHWC_FLOOR_COLS, cols, _pow2(c)))
    width = max(floor, min(cols, _pow2(c)))
    while width > floor and math.ceil(c / width) * width - c > c // 8:
        width //= 2
    return width


def _shift_rows(shift: Tensor) -> tuple[Tensor, int]:
    """``(tensor, row stride)`` the kernels read ``shift[n, c]`` from at ``n stride + c``: ``shift`` itself
    when its channels are contiguous (any row stride, 0 for a vector expanded over N), else a contiguous
    copy; dtypes the kernels do not load are converted to float32."""
    if shift.dtype not in KERNEL_DTYPES:
        shift = shift.float()
    if shift.stride(1) != 1 and shift.shape[1] > 1:
        shift = shift.contiguous()
    return shift, shift.stride(0) if shift.shape[0] > 1 else 0


def launch_over_pixels(
    kernel: Any,
    recorder: KernelRecorder | None,
    pixels: int,
    channels: int,
    tile: int,
    *args: Any,
    **constexprs: Any,
) -> None:
    """Launch a copy-like ``kernel(*args, **constexprs, BLOCK_P=, BLOCK_C=)`` over the ``pixels`` rows of
    ``channels`` values of a channels_last map: a 2-D grid of tiles with at most 128 channels (256 bytes of
    fp16) and ``tile`` elements each."""
    block_c = min(_pow2(channels), 128, tile)
    block_p = max(1, min(tile // block_c, _pow2(pixels)))
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(channels, block_c))
    warps = _warps(block_p * block_c)
    launch(kernel, grid, recorder, *args, **constexprs, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)


def _target_programs(x: Tensor) -> int:
    if x.is_cuda:
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
    return PROGRAMS_PER_SM  # the interpreter runs programs one after another


def single_pass_tile(spatial: int, group_channels: int) -> int:
    """The padded group tile (positions x channels, each a power of two) the single-pass kernel would hold
    in registers; :func:`group_norm_act_triton` takes that kernel by default where it is at most
    :data:`SINGLE_PASS_MAX`."""
    return _pow2(spatial) * _pow2(group_channels)


def default_plan(x: Tensor, num_groups: int) -> GroupNormPlan:
    """The launch plan :func:`group_norm_act_triton` makes for ``x`` without tuning arguments."""
    channels_last = _memory_format(x) == torch.channels_last
    return plan_group_norm(
        tuple(x.shape), num_groups, channels_last=channels_last, target_programs=_target_programs(x)
    )


def _nhwc_launch(plan: GroupNormPlan, shift_stride: int) -> tuple[tuple[int, int], tuple, dict[str, int]]:
    """The channels_last kernels' grid, size arguments and tile constexprs under ``plan``."""
    grid = (plan.n * math.ceil(plan.c / plan.block_c), plan.stats.split)
    cg = plan.c // plan.groups
    sizes = (plan.c, plan.s, cg, plan.groups, plan.stats.chunk, plan.stats.split, shift_stride)
    tiles = {"BLOCK_S": plan.block_s, "BLOCK_C": plan.block_c, "BLOCK_G": plan.block_g, "PARTS": plan.parts}
    return grid, sizes, tiles


@dataclass(frozen=True, eq=False)
class StatsSource:
    """What the channels_last statistics kernel writes to ``x`` before it takes ``x``'s statistics, so that
    the pass producing a map also hands its norm the statistics (:mod:`ldm_sdk.accel.norm_handoff`).

    Without ``phases``: ``x = (y + bias[c]) + (residual + residual_bias[c])`` (``y``, ``residual``: ``x``'s
    shape and strides; each term optional but ``y``). With ``phases = (H, W)``: ``y`` is the channels_last
    ``(N, 4C, H + 1, W + 1)`` output of the sub-pixel phase convolution
    (:func:`ldm_sdk.accel.subpixel.upsample_conv`) and ``x``, ``(N, C, 2H, 2W)``, its interleave plus
    ``bias[c]`` (``residual`` must be None). Sums in float32, rounded once to ``x``'s dtype."""

    y: Tensor
    bias: Tensor | None = None
    residual: Tensor | None = None
    residual_bias: Tensor | None = None
    phases: tuple[int, int] | None = None


SOURCE_LOAD, SOURCE_ADD, SOURCE_PHASES = 0, 1, 2
"""The statistics kernel's ``SOURCE``: read ``x``; write it as a bias + residual sum; write it as the
interleave of sub-pixel phases (:class:`StatsSource`)."""


def _nhwc_statistics(
    x: Tensor,
    shift: Tensor,
    shift_stride: int,
    has_shift: bool,
    plan: GroupNormPlan,
    recorder: KernelRecorder | None,
    source: StatsSource | None = None,
) -> GroupNormStats:
    """Launch the channels_last statistics kernel over ``x`` under ``plan``; with ``source`` it first writes
    ``x`` from it (:class:`StatsSource`) and takes the statistics of what it wrote."""
    partials = plan.n * plan.groups * plan.parts * plan.stats.split
    mean = torch.empty(partials, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    count = torch.empty_like(mean)
    grid, sizes, tiles = _nhwc_launch(plan, shift_stride)
    mode, phase_h, phase_w = SOURCE_LOAD, 0, 0
    y, bias, residual, residual_bias = x, x, x, x  # dummy pointers where absent
    if source is not None:
        mode = SOURCE_ADD if source.phases is None else SOURCE_PHASES
        phase_h, phase_w = source.phases or (0, 0)
        y = source.y
        bias = source.bias if source.bias is not None else x
        residual = source.residual if source.residual is not None else x
        residual_bias = source.residual_bias if source.residual_bias is not None else x
    launch(
        _gn_stats_nhwc_kernel,
        grid,
        recorder,
        x,
        shift,
        y,
        bias,
        residual,
        residual_bias,
        mean,
        m2,
        count,
        *sizes,
        phase_h,
        phase_w,
        **tiles,
        HAS_SHIFT=has_shift,
        SOURCE=mode,
        HAS_BIAS=source is not None and source.bias is not None,
        HAS_RESIDUAL=source is not None and source.residual is not None,
        HAS_RBIAS=source is not None and source.residual_bias is not None,
        STAGES=plan.stages,
        num_warps=plan.num_warps,
    )
    return GroupNormStats(plan, mean, m2, count)


def _check_stats(stats: GroupNormStats, plan: GroupNormPlan, shift: Tensor | None) -> None:
    if shift is not None:
        raise ValueError("stats= holds the statistics of x itself; it cannot be combined with shift=")
    if stats.plan != plan:
        raise ValueError(
            f"stats= was computed under another launch plan ({stats.plan}) than this call's ({plan}): "
            "produce it for this input's shape, groups and tiling, or pass stats=None"
        )


# -- torch-facing kernel calls -----------------------------------------------------------------------------
def group_norm_act_triton(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int,
    eps: float,
    act: Act = "none",
    *,
    shift: Tensor | None = None,
    target_programs: int | None = None,
    max_block: int | None = None,
    recorder: KernelRecorder | None = None,
    single_pass: bool | None = None,
    nhwc: NhwcTiles | None = None,
    stats: GroupNormStats | None = None,
) -> Tensor:
    """:func:`group_norm_act` through the Triton kernels. ``shift`` (optional ``(N, C)``, fp16 / bf16 /
    fp32) is read in its dtype and added to ``x`` in float32 by both passes.
    ``target_programs`` / ``max_block`` / ``nhwc`` tune the launch plan (:func:`plan_group_norm`; defaults:
    4 x the SM count, 2048 / channels_last the tiling's, the tiling by batch); the result does not depend on
    them beyond float32 rounding of the statistics.
    ``stats``: the statistics partials of ``x`` under the plan this call makes (a channels_last ``x``, no
    ``shift``); the statistics pass is skipped.
    ``single_pass``: one program per (sample, group) holding the whole group in registers (one launch, a
    two-pass mean / variance over the registers) instead of the statistics + apply kernels; ``None``
    picks it when the group's padded tile has at most ``SINGLE_PASS_MAX`` elements (the small maps of a
    UNet's inner levels, where the two launches, not the bytes, set the time)."""
    _check_group_norm(x, weight, bias, num_groups, eps, act, shift)
    _check_kernel_input(x, "group_norm_act")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}: move the module to x's device")
    if x.numel() == 0:
        return torch.empty_like(x)
    channels_last = _memory_format(x) == torch.channels_last
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)  # preserve_format: the same strides as x
    if y.stride() != x.stride():  # pragma: no cover - dense tensors keep their strides
        raise RuntimeError(f"internal error: output strides {y.stride()} differ from input {x.stride()}")
    plan = plan_group_norm(
        tuple(x.shape),
        num_groups,
        channels_last=channels_last,
        target_programs=target_programs or _target_programs(x),
        max_block=max_block,
        nhwc=nhwc,
    )
    if stats is not None:
        _check_stats(stats, plan, shift)
        single_pass = False
    groups_total = plan.n * num_groups
    w = weight.contiguous() if weight is not None else x  # a dummy pointer when absent
    b = bias.contiguous() if bias is not None else x
    # shift[n, c] at n shift_stride + c, read in its own dtype and converted to float32 in the kernels: a
    # row-strided view (one block's slice of a batched projection, a bias expanded over N) is read in place
    sh, shift_stride = _shift_rows(shift) if shift is not None else (x, 0)
    has_shift = shift is not None
    cg = plan.c // num_groups
    block_split = max(2, _pow2(plan.stats.split))
    common = {"HAS_W": weight is not None, "HAS_B": bias is not None, "HAS_SHIFT": has_shift, "ACT": act}
    tile = single_pass_tile(plan.s, cg)
    if single_pass is None:
        single_pass = tile <= SINGLE_PASS_MAX
    if single_pass:
        if tile > SINGLE_PASS_MAX:
            raise ValueError(
                f"single_pass needs a group tile of at most {SINGLE_PASS_MAX} elements, got {tile} "
                f"(positions {plan.s} x channels {cg}, padded to powers of two); use single_pass=None"
            )
        stride_s, stride_c = (plan.c, 1) if channels_last else (1, plan.s)
        launch(
            _gn_single_pass_kernel,
            (groups_total,),
            recorder,
            x,
            y,
            w,
            b,
            sh,
            plan.c,
            plan.s,
            num_groups,
            stride_s,
            stride_c,
            shift_stride,
            float(eps),
            CG=cg,
            **common,
            BLOCK_S=_pow2(plan.s),
            BLOCK_CG=_pow2(cg),
            num_warps=min(16, max(4, tile // 1024)),
        )
        return y
    if channels_last:
        # partials per (sample, group, part, chunk), part = the column tile of the group's first channel
        # (0) or the next one (1); count explicit (a part holds any number of the group's channels)
        grid, sizes, tiles = _nhwc_launch(plan, shift_stride)
        if stats is None:
            stats = _nhwc_statistics(x, sh, shift_stride, has_shift, plan, recorder)
        mean, m2, count = stats.mean, stats.m2, stats.count
        launch(
            _gn_apply_nhwc_kernel,
            grid,
            recorder,
            x,
            y,
            w,
            b,
            sh,
            mean,
            m2,
            count,
            *sizes,
            float(eps),
            **tiles,
            BLOCK_PS=max(2, _pow2(plan.parts * plan.stats.split)),
            STAGES=plan.stages,
            num_warps=plan.num_warps,
            **common,
        )
    else:
        mean = torch.empty(groups_total * plan.stats.split, device=x.device, dtype=torch.float32)
        m2 = torch.empty_like(mean)
        length = cg * plan.s
        launch(
            _gn_stats_ncs_kernel,
            (groups_total, plan.stats.split),
            recorder,
            x,
            sh,
            mean,
            m2,
            plan.s,
            cg,
            num_groups,
            length,
            plan.stats.chunk,
            plan.stats.split,
            shift_stride,
            HAS_SHIFT=has_shift,
            BLOCK=plan.block,
            num_warps=plan.num_warps,
        )
        launch(
            _gn_apply_ncs_kernel,
            (plan.n * plan.c, plan.apply.split),
            recorder,
            x,
            y,
            w,
            b,
            sh,
            mean,
            m2,
            plan.c,
            plan.s,
            cg,
            length,
            plan.stats.chunk,
            plan.stats.split,
            plan.apply.chunk,
            shift_stride,
            float(eps),
            BLOCK=plan.apply_block,
            BLOCK_SPLIT=block_split,
            num_warps=plan.apply_warps,
            **common,
        )
    return y


def _geglu_block_c(inner: int) -> int:
    """The widest column tile (1024 .. 128) that wastes at most 1/8 of a row; 128 otherwise."""
    for block in (1024, 512, 256, 128):
        if math.ceil(inner / block) * block - inner <= inner // 8:
            return block
    return 128


def geglu_triton(h: Tensor, *, recorder: KernelRecorder | None = None) -> Tensor:
    """:func:`geglu` through the Triton kernel; ``h`` is made contiguous first when it is not."""
    _check_geglu(h)
    _check_kernel_input(h, "geglu")
    inner = h.shape[-1] // 2
    h = h.contiguous()
    y = torch.empty((*h.shape[:-1], inner), device=h.device, dtype=h.dtype)
    rows = h.numel() // h.shape[-1] if h.numel() else 0
    if rows == 0 or inner == 0:
        return y
    block_c = min(_geglu_block_c(inner), _pow2(inner))
    block_r = max(1, min(MAX_BLOCK // block_c, _pow2(rows)))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(inner, block_c))
    launch(
        _geglu_kernel,
        grid,
        recorder,
        h,
        y,
        rows,
        inner,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=_warps(block_r * block_c),
    )
    return y


# -- kernels -------------------------------------------------------------------------------------------------
if triton is not None:
    from ldm_sdk.kernels.triton_kernels import (
        _geglu_kernel,
        _gn_apply_ncs_kernel,
        _gn_apply_nhwc_kernel,
        _gn_single_pass_kernel,
        _gn_stats_ncs_kernel,
        _gn_stats_nhwc_kernel,
    )


__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "FLOAT32_NOISE",
    "KERNEL_DTYPES",
    "NHWC_PIPELINED",
    "NHWC_PIPELINE_MIN_BATCH",
    "NHWC_PLAIN",
    "SINGLE_PASS_MAX",
    "Act",
    "Backend",
    "Chunking",
    "GroupNormPlan",
    "GroupNormStats",
    "KernelRecorder",
    "Launch",
    "NhwcTiles",
    "StatsSource",
    "TensorStandIn",
    "UlpReport",
    "compare_ulps",
    "geglu",
    "geglu_reference",
    "geglu_triton",
    "group_norm_act",
    "group_norm_act_reference",
    "group_norm_act_triton",
    "launch",
    "launch_over_pixels",
    "output_ulp",
    "plan_group_norm",
    "stand_in",
    "stand_ins",
    "triton_available",
]
