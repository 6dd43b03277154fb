"""Flash attention (forward) as a Triton kernel that does not pad the head dimension to a power of two.

What
----
* :func:`flash_attention` -- ``softmax(q k^T * scale) v`` for ``q`` ``(B, H, Nq, D)`` and ``k`` / ``v``
  ``(B, H, Nk, D)``: what ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` computes (no mask, no
  causal masking, no dropout). One program owns ``BLOCK_M`` queries of one (batch, head) and walks the keys
  in blocks of ``BLOCK_N`` with the online softmax (running row maximum and row sum, the output
  accumulators rescaled when the maximum grows), so the ``Nq x Nk`` scores never reach memory.
* :func:`attention_reference` -- the same maths in torch, in float32: the fallback where Triton or CUDA is
  missing (and when autograd needs a backward) and the tests' oracle.
* :func:`plan_attention` / :class:`AttentionPlan` -- the launch configuration (tiles, head-dim chunks, warps,
  pipeline stages), a deterministic function of the sizes that callers (the benchmark) may override.

``backend="auto"`` (the default of :func:`flash_attention`) runs the kernel when the inputs are CUDA tensors
of dtype fp16 / bf16, Triton imports, no gradient is needed and the head dim is one the kernel takes
(below); otherwise the reference. ``"triton"`` always runs the kernel (errors say why it cannot),
``"reference"`` never does. Dispatch is :func:`ldm_sdk.accel.triton_kernels._use_triton`.

Why
---
SD-1.5's UNet attends with head dims 40 (4096 tokens at 512 px), 80 (1024) and 160 (256 and 64). The
library kernels ``F.scaled_dot_product_attention`` picks on an H100 (cuDNN / flash) round the head dim up to
a supported size -- 40 to 64 -- so about a third of the tensor-core work on the largest (4096-token)
attentions is padding: ~440-500 TFLOP/s of padded work, ~280-310 TFLOP/s of real work. This kernel splits
the head dim into power-of-two chunks of at least 16 (``tl.dot``'s smallest K / N) and masks only the tail
lanes of the last one: 40 = 32 + 16 (48 lanes, 8 masked), 80 = 64 + 16, 160 = 128 + 32 (no padding), 64 and
128 one chunk. ``q k^T`` is the sum of one ``tl.dot`` per chunk and ``p v`` writes one output accumulator
per chunk. The chunk widths are compile-time constants, so each head dim is straight-line code.

Numerics
--------
* Scores ``q k^T`` are accumulated in float32 by the tensor cores from the fp16 / bf16 inputs. The softmax
  is evaluated in base 2 with the scale folded into the exponent: ``p = exp2(s * scale * log2(e) - m)``
  (one FMA per score; ``m`` the running row maximum of the scaled scores), which equals
  ``exp(s * scale - max)`` up to float32 rounding of the exponent.
* Row maximum, row sum and the output accumulators are float32. ``p`` (in ``[0, 1]``) is rounded to the
  input dtype for the ``p v`` product -- as every flash-attention kernel does, cuDNN's included -- so the
  output error is at most about one input-dtype epsilon of ``sum_j p_j |v_j| / sum_j p_j`` (the mean of
  ``|v|`` under the attention weights) on top of the final rounding to the input dtype: a few ulps of a
  typical output, more ulps of outputs that are small through cancellation (mixed-sign ``v`` averaged over
  many keys). The row sum is taken from the unrounded ``p`` (float32).
* The output is ``acc / sum`` (one float32 reciprocal per row), rounded once to the input dtype.
* The reference computes ``softmax((q @ k^T) * scale) @ v`` in float32 (float64 for float64 inputs) and
  rounds once. ``Nk = 0`` gives zeros (as SDPA does); ``Nq = 0`` or ``B * H = 0`` an empty result.

Layouts and limits
------------------
* ``q`` / ``k`` / ``v`` are 4-D with any strides on the batch, head and token dims and unit stride on the
  head dim -- e.g. the ``view(b, n, h, d).transpose(1, 2)`` views of a projection's output, read in place
  (a tensor whose last dim is strided is copied once). ``k`` and ``v`` share one shape; ``q`` has their
  batch, heads and head dim. Strides are passed to the kernel; when they are all multiples of 8 elements
  the kernel is told so (``ALIGN``), which keeps 16-byte loads for head dims such as 40 whose head stride
  is not a multiple of 16.
* The output is ``(B, H, Nq, D)`` stored as ``(B, Nq, H, D)`` -- ``out.transpose(1, 2)`` is contiguous, so
  ``out.transpose(1, 2).reshape(B, Nq, H * D)`` (the heads merged back for ``to_out``) is a view, not a
  copy. The reference returns the same layout.
* The kernel takes fp16 / bf16 and head dims that are multiples of 8 in ``[16, 256]``
  (:data:`KERNEL_HEAD_DIMS`); ``"auto"`` uses the reference otherwise and ``"triton"`` refuses. Any ``Nq``
  and ``Nk`` (query blocks are masked, a ragged last key block is masked with ``-inf``); the grid is
  ``(ceil(Nq / BLOCK_M), H, B)``, so ``H`` and ``B`` are each at most 65535. Base offsets are 64-bit.
* No autotuning (it benchmarks on the first call, which breaks CUDA-graph capture and the cold-start budget):
  :func:`plan_attention` picks the tiles by a fixed rule aimed at the H100, so each (dtype, head dim, plan)
  compiles once. The kernel has no backward: with autograd active, ``"auto"`` uses the reference
  (differentiable) and ``"triton"`` refuses. Triton runs CUDA tensors, or CPU tensors under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before Triton is imported; slow, used by the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm_sdk.accel.triton_kernels import (
    Backend,
    KernelRecorder,
    _compute_dtype,
    _interpreting,
    _pow2,
    _use_triton,
    launch,
    tl,
    triton,
)

ATTENTION_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
"""Input dtypes the kernel takes (the ``p v`` product runs in the input dtype)."""
KERNEL_HEAD_DIMS: tuple[int, ...] = tuple(range(16, 257, 8))
"""Head dims the kernel takes: multiples of 8 (16-byte rows in fp16 / bf16) from 16 to 256."""
H100_SMS = 132
"""Streaming multiprocessors the default plan assumes when the device is not known (H100 SXM)."""
MAX_GRID_YZ = 65535
"""CUDA's limit on the second and third grid dimensions (heads, batch)."""
REFERENCE_SCORES = 2**26
"""Scores (float32: 256 MiB) the reference materialises at once; longer query runs are done in chunks."""


# -- argument checks ---------------------------------------------------------------------------------------
def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a {str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


def _check_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> None:
    for name, t, dims in (("q", q, "B, H, Nq, D"), ("k", k, "B, H, Nk, D"), ("v", v, "B, H, Nk, D")):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D floating-point tensor ({dims}), got {_describe(t)}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have one shape (B, H, Nk, D), got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    b, h, _, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise ValueError(
            f"k / v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and head dim "
            "(B, H, *, D); broadcasting and grouped heads are not supported"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; cast them first"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be None (1 / sqrt(D)) or a finite float, got {scale!r}")


def _kernel_takes(q: Tensor) -> bool:
    return q.dtype in ATTENTION_DTYPES and q.shape[-1] in KERNEL_HEAD_DIMS


def _check_kernel_input(q: Tensor) -> None:
    if q.dtype not in ATTENTION_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in ATTENTION_DTYPES)
        raise ValueError(
            f"the Triton flash_attention kernel takes {valid}, got {q.dtype}; use backend='auto' or "
            "'reference'"
        )
    d = q.shape[-1]
    if d not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the Triton flash_attention kernel takes head dims that are multiples of 8 in [16, 256], got "
            f"D={d}; use backend='auto' or 'reference'"
        )
    if triton is None:
        raise RuntimeError("the Triton flash_attention kernel needs triton, which is not installed")
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            "the Triton flash_attention kernel runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"but the input is on {q.device}; use backend='auto' or 'reference'"
        )
    if q.shape[0] > MAX_GRID_YZ or q.shape[1] > MAX_GRID_YZ:
        raise ValueError(
            f"the Triton flash_attention kernel takes at most {MAX_GRID_YZ} batch entries and heads (grid "
            f"dims), got B={q.shape[0]}, H={q.shape[1]}; use backend='reference'"
        )


def _default_scale(d: int, scale: float | None) -> float:
    return float(scale) if scale is not None else 1.0 / math.sqrt(d)


def _heads_last_layout(out: Tensor) -> Tensor:
    """``out`` ``(B, H, N, D)`` with memory layout ``(B, N, H, D)`` (a copy unless it already is)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


# -- reference (float32 maths, one rounding) -----------------------------------------------------------------
def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """``softmax((q @ k^T) * scale) @ v`` computed in float32 (float64 for float64 inputs), cast to
    ``q.dtype`` once; ``scale`` defaults to ``1 / sqrt(D)``. Returned ``(B, H, Nq, D)`` with memory layout
    ``(B, Nq, H, D)``, like :func:`flash_attention`. Long query runs are computed in chunks so that at most
    :data:`REFERENCE_SCORES` scores exist at once (rows are independent: the same maths)."""
    _check_attention(q, k, v, scale)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    s = _default_scale(d, scale)
    if q.numel() == 0:
        return _heads_last_layout(torch.empty_like(q))
    ct = _compute_dtype(q.dtype)
    qf, kt, vf = q.to(ct), k.to(ct).transpose(-1, -2), v.to(ct)
    rows = max(1, REFERENCE_SCORES // max(1, b * h * nk))
    parts = [torch.softmax((qf[:, :, i : i + rows] @ kt) * s, dim=-1) @ vf for i in range(0, nq, rows)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return _heads_last_layout(out.to(q.dtype))


# -- launch plans ----------------------------------------------------------------------------------------
def split_head_dim(d: int) -> tuple[int, int]:
    """``(D0, D1)``: the power-of-two chunks (each >= 16) the kernel covers head dim ``d`` with, ``D1 = 0``
    for one chunk. ``D0`` is the largest power of two <= ``d``, ``D1`` the smallest one >= the rest; one
    (masked) chunk of ``next_pow2(d)`` lanes when two chunks would not be narrower (24, 112, 120, 200 ...).
    40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0)."""
    if d < 1:
        raise ValueError(f"head dim must be >= 1, got {d}")
    padded = max(16, _pow2(d))
    d0 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d0
    if rest <= 0:
        return padded, 0
    d1 = max(16, _pow2(rest))
    return (d0, d1) if d0 + d1 < padded else (padded, 0)


@dataclass(frozen=True)
class AttentionPlan:
    """How :func:`flash_attention` launches: ``block_m`` queries per program, keys in blocks of
    ``block_n``, the head dim in chunks ``d0`` (+ ``d1`` when > 0; lanes past ``D`` are masked), and the
    Triton launch options ``num_warps`` / ``num_stages`` (software-pipelining depth of the key loop)."""

    block_m: int
    block_n: int
    d0: int
    d1: int
    num_warps: int
    num_stages: int
    exp_emu: int = 0
    """0: every ``exp2`` of the scores on the MUFU (``ex2.approx``); 2 / 4: one in ``exp_emu`` score
    columns of the full key blocks (every other / every fourth group of 8 columns) through
    :func:`_exp2_poly` on the FMA pipe instead, so the two units share the exponentials (the ragged masked
    block always uses the MUFU)."""
    exp_deg: int = 5
    """Degree (3 .. 5) of the software ``exp2``'s polynomial (relative error ~2**-13.3 / -18.4 / -22.3)."""
    lazy_rescale: int = 0
    """0: rescale the accumulators whenever a row maximum grows; ``t`` in 1 .. 12: only when some row's
    maximum grows by more than ``t`` (log2 units), else keep the stale maximum (weights up to ``2**t``).
    Exact either way: numerator and denominator always use the maximum actually applied."""

    @property
    def width(self) -> int:
        """Head-dim lanes the tensor cores compute (``d0 + d1``; ``D`` plus the masked tail)."""
        return self.d0 + self.d1

    def __str__(self) -> str:
        chunks = f"{self.d0}+{self.d1}" if self.d1 else f"{self.d0}"
        name = f"m{self.block_m}_n{self.block_n}_d{chunks}_w{self.num_warps}_s{self.num_stages}"
        if self.exp_emu:
            name += f"_e{self.exp_emu}p{self.exp_deg}"
        if self.lazy_rescale:
            name += f"_r{self.lazy_rescale}"
        return name


def plan_attention(nq: int, nk: int, d: int, *, batch_heads: int = 1, sms: int = H100_SMS) -> AttentionPlan:
    """The default launch plan for ``Nq`` queries over ``Nk`` keys of head dim ``d`` (a fixed rule aimed at
    the H100; ``bench/bench_attention.py`` measures alternatives):

    * chunks: :func:`split_head_dim`;
    * ``block_m`` 128, halved to 64 while ``ceil(Nq / block_m) * batch_heads`` (the programs) is below
      ``sms`` (one wave would leave SMs idle), and never above ``Nq`` rounded up to a power of two (>= 16);
    * ``block_n`` 64 (at most ``Nk`` rounded up to a power of two, >= 16): a ragged key count such as 77 is
      one full block and one masked one;
    * 8 warps for ``block_m`` 128 or more than 128 head-dim lanes, else 4;
    * 3 pipeline stages up to 128 lanes, 2 above (the K / V tiles of wide heads fill shared memory).

    Compiled offline for sm_90 (Triton 3.8), the plans this gives at the SD-1.5 shapes use 117-216 registers
    per thread and no spills; 4 warps at ``block_m`` 128 would need 200-255 (and spill at D = 160).
    """
    for name, value in (("nq", nq), ("nk", nk), ("d", d), ("batch_heads", batch_heads), ("sms", sms)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "d" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'd' else 0}, got {value!r}")
    d0, d1 = split_head_dim(d)
    width = d0 + d1
    block_m = 128
    while block_m > 64 and math.ceil(nq / block_m) * batch_heads < sms:
        block_m //= 2
    block_m = max(16, min(block_m, _pow2(max(1, nq))))
    block_n = max(16, min(64, _pow2(max(1, nk))))
    num_warps = 8 if block_m >= 128 or width > 128 else 4
    num_stages = 3 if width <= 128 else 2
    return AttentionPlan(block_m, block_n, d0, d1, num_warps, num_stages)


def _is_pow2(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def _check_plan(plan: AttentionPlan, d: int) -> None:
    if not isinstance(plan, AttentionPlan):
        raise ValueError(f"plan must be None or an AttentionPlan, got {type(plan).__name__}")
    for name in ("block_m", "block_n"):
        value = getattr(plan, name)
        if not _is_pow2(value) or not 16 <= value <= 256:
            raise ValueError(f"plan.{name} must be a power of two in [16, 256], got {value!r}")
    if not _is_pow2(plan.d0) or plan.d0 < 16 or (plan.d1 != 0 and (not _is_pow2(plan.d1) or plan.d1 < 16)):
        raise ValueError(
            f"plan.d0 must be a power of two >= 16 and plan.d1 0 or a power of two >= 16, got "
            f"d0={plan.d0!r}, d1={plan.d1!r}"
        )
    if plan.d0 + plan.d1 < d or (plan.d1 and plan.d0 >= d):
        raise ValueError(
            f"plan chunks d0={plan.d0}, d1={plan.d1} do not fit head dim {d}: d0 + d1 must be >= D, and a "
            f"second chunk needs d0 < D (e.g. split_head_dim({d}) = {split_head_dim(d)})"
        )
    if not _is_pow2(plan.num_warps) or plan.num_warps > 16:
        raise ValueError(f"plan.num_warps must be a power of two in [1, 16], got {plan.num_warps!r}")
    if isinstance(plan.num_stages, bool) or not isinstance(plan.num_stages, int) or plan.num_stages < 1:
        raise ValueError(f"plan.num_stages must be an int >= 1, got {plan.num_stages!r}")
    if plan.exp_emu not in (0, 2, 4) or isinstance(plan.exp_emu, bool):
        raise ValueError(f"plan.exp_emu must be 0, 2 or 4, got {plan.exp_emu!r}")
    if plan.exp_emu and plan.block_n < 8 * plan.exp_emu:
        raise ValueError(
            f"plan.exp_emu={plan.exp_emu} needs block_n >= {8 * plan.exp_emu}, got {plan.block_n}"
        )
    if plan.exp_deg not in (3, 4, 5) or isinstance(plan.exp_deg, bool):
        raise ValueError(f"plan.exp_deg must be 3, 4 or 5, got {plan.exp_deg!r}")
    lazy = plan.lazy_rescale
    if isinstance(lazy, bool) or not isinstance(lazy, int) or not 0 <= lazy <= 12:
        raise ValueError(f"plan.lazy_rescale must be an int in [0, 12], got {lazy!r}")


def _sm_count(t: Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return H100_SMS  # the interpreter: plan as for the target GPU


# -- dispatch ------------------------------------------------------------------------------------------------
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
    plan: AttentionPlan | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, scale=scale)`` (no mask, no dropout) for ``q``
    ``(B, H, Nq, D)`` and ``k`` / ``v`` ``(B, H, Nk, D)`` (see the module doc); returns ``(B, H, Nq, D)``
    stored as ``(B, Nq, H, D)``. ``backend`` picks Triton or the reference; ``plan`` overrides the kernel's
    launch plan (:func:`plan_attention`)."""
    _check_attention(q, k, v, scale)
    if _use_triton(backend, "flash_attention", q, k, v) and (backend == "triton" or _kernel_takes(q)):
        return flash_attention_triton(q, k, v, scale=scale, plan=plan, recorder=recorder)
    return attention_reference(q, k, v, scale)


def flash_attention_runs_kernel(q: Tensor, k: Tensor, v: Tensor, backend: Backend = "auto") -> bool:
    """Whether :func:`flash_attention` with ``backend`` would run the Triton kernel for these inputs (a
    caller with a faster non-Triton path of its own, such as SDPA, takes that one otherwise)."""
    return _use_triton(backend, "flash_attention", q, k, v) and _kernel_takes(q)


# -- torch-facing kernel call --------------------------------------------------------------------------------
def flash_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    plan: AttentionPlan | None = None,
    recorder: KernelRecorder | None = None,
) -> Tensor:
    """:func:`flash_attention` through the Triton kernel. ``plan`` (default :func:`plan_attention` for the
    sizes and the device's SM count) sets the tiles, head-dim chunks, warps and stages; the result does not
    depend on it beyond float32 rounding (the order of the key blocks' contributions)."""
    _check_attention(q, k, v, scale)
    _check_kernel_input(q)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if plan is None:
        plan = plan_attention(nq, nk, d, batch_heads=b * h, sms=_sm_count(q))
    _check_plan(plan, d)
    out = torch.empty((b, nq, h, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    if out.numel() == 0:
        return out
    if nk == 0:
        return out.zero_()  # an empty softmax: SDPA returns zeros
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # strides of size-1 dims are never used; 0 keeps them from spoiling the alignment hint
    strides = [
        s if n > 1 else 0 for t in (q, k, v, out) for s, n in zip(t.stride()[:3], t.shape[:3], strict=True)
    ]
    align = 8 if all(s % 8 == 0 for s in strides) else 1
    s = _default_scale(d, scale)
    launch(
        _flash_attention_kernel,
        (triton.cdiv(nq, plan.block_m), h, b),
        recorder,
        q,
        k,
        v,
        out,
        *(st // align for st in strides),
        nq,
        nk,
        s * math.log2(math.e),
        D=d,
        D0=plan.d0,
        D1=plan.d1 if plan.d1 else 16,  # a dummy width when there is no second chunk (never read)
        HAS_SECOND=plan.d1 > 0,
        SCALE_FIRST=not s > 0,
        ALIGN=align,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        EXP_EMU=plan.exp_emu,
        EXP_DEG=plan.exp_deg,
        LAZY=plan.lazy_rescale,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return out


# -- kernels -------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _load_tile(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        """A ``[rows, cols]`` tile, zero where ``row_ok`` / ``col_ok`` is false (each mask applied only
        when its flag says it can be false)."""
        if MASK_ROWS:
            if MASK_COLS:
                tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        elif MASK_COLS:
            tile = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
        return tile

    @triton.jit
    def _exp2_poly(x, DEG: tl.constexpr):
        """``2**x`` for ``x >= -126`` (smaller ``x`` give ``2**-126``) without the MUFU: ``x = n + f`` with
        ``n = round(x)`` (the float32 magic-number rounding: ``x + 1.5 * 2**23`` holds ``n`` in its low
        mantissa bits) and ``f`` in ``[-1/2, 1/2]``, ``2**f`` by a degree-``DEG`` polynomial with constant
        term 1 (minimax relative error, coefficients rounded to float32: 2**-13.3 / -18.4 / -22.3 for
        3 / 4 / 5 with float32 evaluation), and ``2**n`` added to the exponent field as the integer
        ``n << 23``. All FMA / integer-pipe work. The result is a normal float: ``n = -126`` only comes
        with ``f >= 0``, where the polynomial is >= 1 (hence the constant term 1)."""
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        if DEG == 3:
            p = ((0.05500893294811249 * f + 0.24221095442771912) * f + 0.6932829022407532) * f + 1.0
        elif DEG == 4:
            p = (0.009582852944731712 * f + 0.055906426161527634) * f + 0.24024099111557007
            p = (p * f + 0.6931241750717163) * f + 1.0
        else:
            p = (0.001326472731307149 * f + 0.009671512991189957) * f + 0.05550733581185341
            p = ((p * f + 0.24022242426872253) * f + 0.6931470036506653) * f + 1.0
        bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _exp2_mixed(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMU: tl.constexpr, DEG: tl.constexpr):
        """``exp2`` of a ``[BLOCK_M, BLOCK_N]`` tile: all on the MUFU (``EMU`` 0), or the columns ``c`` with
        ``(c // 8) % EMU == EMU - 1`` by :func:`_exp2_poly` (``EMU`` 2 or 4). The tile is split along groups
        of 8 columns (``reshape`` / ``permute`` / ``split``): in the MMA accumulator layout a thread's
        registers hold column pairs of each 8-column group, so the split and the ``join`` back move no data
        (checked on the sm_90 build: no extra shared-memory traffic)."""
        if EMU == 0:
            p = tl.math.exp2(x)
        elif EMU == 2:
            x4 = tl.permute(tl.reshape(x, [BLOCK_M, BLOCK_N // 16, 2, 8]), (0, 1, 3, 2))
            a, b = tl.split(x4)
            y = tl.join(tl.math.exp2(a), _exp2_poly(b, DEG))
            p = tl.reshape(tl.permute(y, (0, 1, 3, 2)), [BLOCK_M, BLOCK_N])
        else:
            x5 = tl.permute(tl.reshape(x, [BLOCK_M, BLOCK_N // 32, 2, 2, 8]), (0, 1, 4, 2, 3))
            a, b = tl.split(x5)  # bit 3 of the column: 0 / 1
            b0, b1 = tl.split(b)  # bit 4 of the column, of the odd groups
            y = tl.join(tl.math.exp2(a), tl.join(tl.math.exp2(b0), _exp2_poly(b1, DEG)))
            p = tl.reshape(tl.permute(y, (0, 1, 3, 4, 2)), [BLOCK_M, BLOCK_N])
        return p

    @triton.jit
    def _attend_key_block(
        acc0,
        acc1,
        l_i,
        m_i,
        q0,
        q1,
        k_blk,
        v_blk,
        sk_n,
        sv_n,
        n_valid,
        qk_scale,
        D: tl.constexpr,
        D0: tl.constexpr,
        D1: tl.constexpr,
        HAS_SECOND: tl.constexpr,
        SCALE_FIRST: tl.constexpr,
        MASK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EXP_EMU: tl.constexpr,
        EXP_DEG: tl.constexpr,
        LAZY: tl.constexpr,
    ):
        """One key block (rows ``k_blk + [0, BLOCK_N) sk_n``; with ``MASK_N`` only the first ``n_valid``
        exist) into the online-softmax state: scores as per-chunk dots, new row maximum ``m`` (of the
        scores times ``qk_scale = scale log2 e``), ``p = exp2(scaled - m)``, accumulators and row sum
        rescaled by ``exp2(m_old - m)`` and ``p v`` added per chunk (``p`` rounded to the input dtype).
        ``LAZY > 0``: the maximum (and the rescale) is only updated when some row's maximum grows by more
        than ``LAZY``; ``EXP_EMU``: see :func:`_exp2_mixed`."""
        rows = tl.arange(0, BLOCK_N)
        c0 = tl.arange(0, D0)
        c1 = D0 + tl.arange(0, D1)
        row_ok = rows < n_valid
        k0 = _load_tile(k_blk + rows[:, None] * sk_n + c0[None, :], row_ok, c0 < D, MASK_N, D0 > D)
        s = tl.dot(q0, tl.trans(k0))
        if HAS_SECOND:
            k1 = _load_tile(k_blk + rows[:, None] * sk_n + c1[None, :], row_ok, c1 < D, MASK_N, D0 + D1 > D)
            s = tl.dot(q1, tl.trans(k1), s)
        if SCALE_FIRST:  # scale <= 0: the maximum of the scaled scores is not the scaled maximum
            s = s * qk_scale
            if MASK_N:
                s = tl.where(row_ok[None, :], s, float("-inf"))
            m_cand = tl.maximum(m_i, tl.max(s, 1))
        else:
            if MASK_N:
                s = tl.where(row_ok[None, :], s, float("-inf"))
            m_cand = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if LAZY > 0:
            m_new = m_i
            if tl.max(m_cand - m_i, 0) > LAZY:  # +inf on the first block (m_i = -inf)
                m_new = m_cand
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc0 = acc0 * alpha[:, None]
                acc1 = acc1 * alpha[:, None]
        else:
            m_new = m_cand
        if SCALE_FIRST:  # noqa: SIM108 (constexpr branches)
            x = s - m_new[:, None]
        else:
            x = s * qk_scale - m_new[:, None]
        if MASK_N:  # noqa: SIM108 -- masked keys must weigh exactly 0 (the software exp2 clamps at 2**-126)
            p = tl.math.exp2(x)
        else:
            p = _exp2_mixed(x, BLOCK_M, BLOCK_N, EXP_EMU, EXP_DEG)
        if LAZY == 0:  # the rescale by exp2(m_old - m_new), 0 on the first block (m_i = -inf)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
        else:
            alpha = l_i  # unused
            l_i = l_i + tl.sum(p, 1)
        p_in = p.to(k0.dtype)
        v0 = _load_tile(v_blk + rows[:, None] * sv_n + c0[None, :], row_ok, c0 < D, MASK_N, D0 > D)
        if LAZY == 0:
            acc0 = acc0 * alpha[:, None]
        acc0 = tl.dot(p_in, v0, acc0)
        if HAS_SECOND:
            v1 = _load_tile(v_blk + rows[:, None] * sv_n + c1[None, :], row_ok, c1 < D, MASK_N, D0 + D1 > D)
            if LAZY == 0:
                acc1 = acc1 * alpha[:, None]
            acc1 = tl.dot(p_in, v1, acc1)
        return acc0, acc1, l_i, m_new

    @triton.jit(do_not_specialize=["NQ", "NK"])
    def _flash_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        SQ_B,
        SQ_H,
        SQ_N,
        SK_B,
        SK_H,
        SK_N,
        SV_B,
        SV_H,
        SV_N,
        SO_B,
        SO_H,
        SO_N,
        NQ,
        NK,
        qk_scale,
        D: tl.constexpr,
        D0: tl.constexpr,
        D1: tl.constexpr,
        HAS_SECOND: tl.constexpr,
        SCALE_FIRST: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EXP_EMU: tl.constexpr,
        EXP_DEG: tl.constexpr,
        LAZY: tl.constexpr,
    ):
        """Program ``(m, h, b)``: queries ``[m BLOCK_M, (m + 1) BLOCK_M)`` of head ``h`` of batch entry
        ``b`` against all ``NK`` keys -- the full key blocks unmasked, then the ragged last one (if any)
        masked -- and the normalised output stored. Strides are in units of ``ALIGN`` elements (so the
        compiler sees offsets that are multiples of ``ALIGN``); the head dim has unit stride."""
        m = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        sq_n = SQ_N * ALIGN
        sk_n = SK_N * ALIGN
        sv_n = SV_N * ALIGN
        so_n = SO_N * ALIGN
        row0 = m.to(tl.int64) * BLOCK_M
        rows = tl.arange(0, BLOCK_M)
        row_ok = row0 + rows < NQ
        c0 = tl.arange(0, D0)
        c1 = D0 + tl.arange(0, D1)
        q_blk = q_ptr + b * (SQ_B * ALIGN) + h * (SQ_H * ALIGN) + row0 * sq_n
        q0 = _load_tile(q_blk + rows[:, None] * sq_n + c0[None, :], row_ok, c0 < D, True, D0 > D)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if HAS_SECOND:
            q1 = _load_tile(q_blk + rows[:, None] * sq_n + c1[None, :], row_ok, c1 < D, True, D0 + D1 > D)
        else:
            q1 = q0  # never read
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)  # carried unchanged without a second chunk
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        k_blk = k_ptr + b * (SK_B * ALIGN) + h * (SK_H * ALIGN)
        v_blk = v_ptr + b * (SV_B * ALIGN) + h * (SV_H * ALIGN)
        n_full = (NK // BLOCK_N) * BLOCK_N
        for _ in range(0, n_full, BLOCK_N):
            acc0, acc1, l_i, m_i = _attend_key_block(
                acc0, acc1, l_i, m_i, q0, q1, k_blk, v_blk, sk_n, sv_n, BLOCK_N, qk_scale,
                D, D0, D1, HAS_SECOND, SCALE_FIRST, False, BLOCK_M, BLOCK_N, EXP_EMU, EXP_DEG, LAZY,
            )  # fmt: skip
            k_blk += BLOCK_N * sk_n
            v_blk += BLOCK_N * sv_n
        if n_full < NK:
            acc0, acc1, l_i, m_i = _attend_key_block(
                acc0, acc1, l_i, m_i, q0, q1, k_blk, v_blk, sk_n, sv_n, NK - n_full, qk_scale,
                D, D0, D1, HAS_SECOND, SCALE_FIRST, True, BLOCK_M, BLOCK_N, 0, EXP_DEG, LAZY,
            )  # fmt: skip
        inv = 1.0 / l_i
        o_blk = o_ptr + b * (SO_B * ALIGN) + h * (SO_H * ALIGN) + row0 * so_n
        out0 = (acc0 * inv[:, None]).to(o_ptr.dtype.element_ty)
        if D0 > D:
            tl.store(
                o_blk + rows[:, None] * so_n + c0[None, :], out0, mask=row_ok[:, None] & (c0 < D)[None, :]
            )
        else:
            tl.store(o_blk + rows[:, None] * so_n + c0[None, :], out0, mask=row_ok[:, None])
        if HAS_SECOND:
            out1 = (acc1 * inv[:, None]).to(o_ptr.dtype.element_ty)
            tl.store(
                o_blk + rows[:, None] * so_n + c1[None, :], out1, mask=row_ok[:, None] & (c1 < D)[None, :]
            )


__all__ = [
    "ATTENTION_DTYPES",
    "H100_SMS",
    "KERNEL_HEAD_DIMS",
    "AttentionPlan",
    "attention_reference",
    "flash_attention",
    "flash_attention_triton",
    "plan_attention",
    "split_head_dim",
]
