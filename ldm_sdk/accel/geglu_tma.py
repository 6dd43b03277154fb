"""The GEGLU dual GEMM of :mod:`ldm_sdk.accel.geglu_gemm` as a persistent kernel fed by the tensor memory
accelerator (TMA): the form it takes on Hopper GPUs.

Why: the pointer-addressed dual GEMM beat cuBLAS + the gating kernel only at SD-1.5's outer level
(``C = 320``) and ran its products at 280-300 TFLOP/s on an H100 where cuBLAS' GEMM alone reaches 400-480
(``bench/results/geglu_gemm_h100.json``). Here each input tile arrives by one TMA copy (no address
arithmetic in the kernel's threads, out-of-range rows and columns zero-filled by the copy engine, the
result written back by a TMA store that clips them), and one program per SM walks the output tiles in
grouped order, so the next tile's loads overlap the last one's epilogue. Same products, same epilogue,
same rounding as the pointer kernel: ``(acc_a + b_a) * 0.5 g (1 + erf(g / sqrt 2))``, ``g = acc_g + b_g``,
float32 accumulators, one rounding to the input dtype.

Measured on an H100, fp16, graph replay (``bench/bench_geglu_gemm.py``,
``bench/results/geglu_gemm_tma_h100.json``), against the pointer kernel and cuBLAS + the gating kernel:
``C = 320`` at batch 2 (``M = 8192``) 42.3 us against 46.3 and 54.9, at batch 16 323.8 against 360.2 and
396.5; ``C = 640`` 35.1 against 38.5 and 36.2 (batch 2), 239.4 against 277.1 and 276.5 (batch 16). The
UNet step at batch 16: 32.49 -> 32.12 ms (``bench/ablate_graph_kernels.py``, ``no_geglu_tma``); at batch 2
within 0.2 %.

Host cost: the three descriptors are built per call (about 60 us of Python): nothing inside a CUDA graph,
which is how the fast path runs the UNet.

Limits (:func:`tma_fits`): a CUDA device of compute capability 9.0 or newer, Triton's
``TensorDescriptor``, fp16 / bf16, 16-byte aligned base pointers and row strides (``C`` and ``I``
multiples of 8, which :mod:`~ldm_sdk.accel.geglu_gemm` requires anyway). Under the Triton interpreter the
kernel runs too (the tests pass a :class:`TmaPlan` explicitly); ``"auto"`` takes it on CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm_sdk.accel.triton_kernels import KernelRecorder, TensorDescriptor, _interpreting, launch, triton

TMA_MAX_CHANNELS = 640
"""Widest input (``C``) where the TMA dual GEMM measured faster than cuBLAS' GEMM + the gating kernel (H100,
fp16, graph replay, ``bench/bench_geglu_gemm.py``). At ``C = 1280`` it lost at batch 2 (36.4 against 30.8 us
at 512 rows, 18.0 against 12.6 at 128) and measured even to 10 % ahead at batch 16 over two runs (214.7 /
202.8 against 213.0 / 225.5 us at 4096 rows), so the library path stays there."""
FLATTEN_MIN_ROWS = 32768
"""From this many rows the tile loop is flattened into the K loop (the next tile's first loads issued
during this tile's epilogue). It cost at fewer rows in every sweep (``bench/bench_geglu_gemm.py``); at
``M = 65536`` it measured faster in the first sweep (314.7 against 347.7 us, 4 / 3 stages) and within the
noise in the second (323.8 / 352.3 against 315.4 / 318.8 us; one plan timed twice in that sweep differed by
up to 9 %), so this choice is not settled."""


@dataclass(frozen=True)
class TmaPlan:
    """How the TMA kernel launches: output tile ``block_m x block_n`` of each half, K step ``block_k``,
    warps, software-pipeline stages of the tile loop, whether that loop is flattened into the K loop,
    ``group_m`` row tiles per group of the tile order, and programs per SM."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    stages: int = 3
    flatten: bool = False
    group_m: int = 8

    def __post_init__(self) -> None:
        check_plan_fields(self, ("stages", "group_m"))
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8 (one or two warpgroups), got {self.num_warps!r}")

    def tiles(self, m: int, inner: int) -> int:
        """Output tiles of an ``m x inner`` result."""
        return triton.cdiv(m, self.block_m) * triton.cdiv(inner, self.block_n)

    def label(self) -> str:
        """``tma_BMxBNxBK_wW_sS_flat|nest_gG``, for tables."""
        loop = "flat" if self.flatten else "nest"
        tile = f"{self.block_m}x{self.block_n}x{self.block_k}"
        return f"tma_{tile}_w{self.num_warps}_s{self.stages}_{loop}_g{self.group_m}"


def check_plan_fields(plan: object, counts: tuple[str, ...]) -> None:
    """A GEMM plan's checks (``ValueError`` saying what is valid): ``block_m``, ``block_n``, ``block_k``
    powers of two >= 16 (``tl.dot``'s minimum), the fields named in ``counts`` ints >= 1."""
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(plan, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
    for name in counts:
        value = getattr(plan, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def plan_tma(m: int) -> TmaPlan:
    """The plan for ``m`` rows: 128 x 128 tiles of each half (two float32 accumulators over two
    warpgroups), K step 64; the tile loop flattened from :data:`FLATTEN_MIN_ROWS` rows with 4 stages,
    nested below with 3 (the fastest of ``bench/bench_geglu_gemm.py``'s sweep at SD-1.5's shapes)."""
    if m >= FLATTEN_MIN_ROWS:
        return TmaPlan(stages=4, flatten=True)
    return TmaPlan()


def tma_fits(x2: Tensor, weight: Tensor) -> bool:
    """Whether the TMA kernel takes this ``(M, C)`` input and ``(2 I, C)`` weight on its device: CUDA of
    compute capability >= 9.0, Triton's ``TensorDescriptor``, fp16 / bf16 of one dtype, unit column
    strides, 16-byte aligned base pointers and row strides."""
    return tma_device(x2.device) and _aligned(x2, weight)


def tma_device(device: torch.device) -> bool:
    """Whether the kernel runs on ``device``: CUDA of compute capability >= 9.0 (Hopper's TMA) with
    Triton's ``TensorDescriptor`` importable."""
    if TensorDescriptor is None or triton is None or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _aligned(x2: Tensor, weight: Tensor) -> bool:
    return (
        x2.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x2.dtype
        and x2.stride(1) == 1
        and weight.stride(1) == 1
        and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x2, weight))
    )


def geglu_linear_tma(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: Tensor,
    *,
    plan: TmaPlan | None = None,
    sms: int | None = None,
    recorder: KernelRecorder | None = None,
) -> None:
    """Write ``a * gelu(gate)`` of ``F.linear(x2, weight, bias)`` into ``out`` (``(M, I)``, contiguous) with
    the TMA kernel. ``x2`` ``(M, C)`` and ``weight`` ``(2 I, C)`` as :func:`tma_fits` takes them (the caller
    checks); ``bias`` ``(2 I,)`` or None, any float dtype the kernels read; ``sms``: programs to launch at
    most (default: the device's SM count)."""
    if TensorDescriptor is None or not _aligned(x2, weight):
        raise ValueError(
            "the TMA GEGLU kernel needs Triton's TensorDescriptor and fp16 / bf16 x and weight of one dtype "
            "with unit column strides and 16-byte aligned base pointers and row strides"
        )
    if _interpreting() and x2.dtype == torch.bfloat16:
        raise ValueError(
            "the Triton interpreter multiplies bf16 tl.dot operands wrongly (as their bit patterns): run the "
            "TMA GEGLU kernel on fp16 there, or on a GPU"
        )
    m, channels = x2.shape
    inner = weight.shape[0] // 2
    plan = plan or plan_tma(m)
    x_desc = TensorDescriptor.from_tensor(x2, [plan.block_m, plan.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [plan.block_n, plan.block_k])
    y_desc = TensorDescriptor.from_tensor(out, [plan.block_m, plan.block_n])
    if sms is None:
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
    programs = max(1, min(sms, plan.tiles(m, inner)))
    launch(
        _geglu_tma_kernel,
        (programs,),
        recorder,
        x_desc,
        w_desc,
        y_desc,
        bias if bias is not None else weight,  # a dummy pointer when absent
        m,
        inner,
        channels,
        PROGRAMS=programs,
        HAS_BIAS=bias is not None,
        BF16=x2.dtype == torch.bfloat16,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k,
        GROUP_M=plan.group_m,
        FLATTEN=plan.flatten,
        STAGES=plan.stages,
        num_warps=plan.num_warps,
    )


if triton is not None:
    from ldm_sdk.kernels.geglu_tma import (
        _geglu_tma_kernel,
    )


__all__ = [
    "FLATTEN_MIN_ROWS",
    "TMA_MAX_CHANNELS",
    "TmaPlan",
    "check_plan_fields",
    "geglu_linear_tma",
    "plan_tma",
    "tma_device",
    "tma_fits",
]
