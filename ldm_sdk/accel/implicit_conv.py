"""A 3x3 convolution of our own (a Triton implicit GEMM fed by TMA copies on Hopper) that ends in the
epilogue of the residual block around it: the bias, the residual with its bias, and the statistics of the
next GroupNorm, all on the accumulators.

Why: in the first stage's decoder every ``ResnetBlock`` ends with ``conv2`` and one more pass that adds
``conv2``'s bias and the skip and takes the statistics of the next block's first norm
(:mod:`ldm_sdk.accel.norm_handoff`) -- at 512 x 512 x 128 a pass reading two 64 MiB maps and writing one.
cuDNN cannot take that pass into the convolution (it adds even its own bias in a pass of its own); this
kernel does, and so replaces the convolution and the pass. It pays where the maps are wide
(:data:`EPILOGUE_MIN_WIDTH`): the convolution alone runs at 0.87-1.02x cuDNN's speed at the decoder's
shapes on an H100 (``bench/probe_implicit_conv.py``,
``bench/results/probe_implicit_conv_persistent_h100.json``), the epilogue costs less than the pass it
saves from 256 px up (``bench/bench_implicit_conv.py``). What did not pay: applying the norm + SiLU in
the convolution's input loads (it is repeated for each of the 9 taps: 3-4x slower,
``bench/results/probe_implicit_conv_prologue_h100.json``), and taking ``norm2``'s statistics in
``conv1``'s epilogue (the statistics pass it saves is cheaper than what the kernel gives up against
cuDNN); so ``conv1`` stays with cuDNN.

What :func:`conv3x3_fused` computes, for a channels_last ``x`` ``(N, C, H, W)`` and a ``(CO, C, 3, 3)``
weight: ``out = (conv(x, weight) + bias) + (residual + residual_bias)`` (each term optional), float32
accumulators, one rounding to ``x``'s dtype, written channels_last; with ``stats_groups`` also the
statistics of ``out`` for that many groups as a :class:`~ldm_sdk.accel.triton_kernels.GroupNormStats`
under the launch plan the norm will make for ``out`` (:func:`~ldm_sdk.accel.triton_kernels.group_norm_act`
``stats=``): per output tile and column the count, mean and sum of squared deviations of the rounded
values stored, merged per group by Chan's formula (no sums of squares of raw values). They equal the
norm's own statistics to float32 rounding, not bit for bit (another summation order).

Limits (:func:`fused_conv_fits` says which one failed): CUDA of compute capability 9.0 or newer (TMA) or
the Triton interpreter, Triton's ``TensorDescriptor``, fp16 / bf16 ``x`` and weight of one dtype, ``C`` a
multiple of 64 (the K step), ``CO`` a multiple of 8 (16-byte rows for TMA), a plain 3x3 convolution
(stride 1, zero padding 1, no dilation, one group); statistics need a power-of-two channel count per group.
No backward: the inference path only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm_sdk.accel.norm_handoff import NormHandoff, wants_stats
from ldm_sdk.accel.triton_kernels import (
    GroupNormStats,
    KernelRecorder,
    TensorDescriptor,
    _interpreting,
    _pow2,
    default_plan,
    launch,
    triton,
)

BLOCK_K = 64
"""Input channels per K step (the loop runs ``9 C / BLOCK_K`` steps): ``C`` must be a multiple."""
EPILOGUE_MIN_WIDTH = 256
"""Narrowest map where the decoder's ``conv2`` with its epilogue (bias, skip, the next norm's statistics)
measured faster than cuDNN + the bias / residual / statistics pass (H100, fp16, graph replay, the
default plans, ``bench/bench_implicit_conv.py``, ``bench/results/bench_implicit_conv_h100.json``): 512 x
512 x 128 186.1 against 195.1 us, after the 256 -> 128 block's first convolution 188.7 against 212.1;
256 x 256 x 256 147.8 against 149.4, after 512 -> 256 150.8 against 161.8. At 128 x 128 x 512 the
default plan lost (164.9 against 132.6; the best plan swept, 122.6, won in that run and lost in the
one before, ``bench_implicit_conv_run1_h100.json``: 125.3 against 121.5), at 64 x 64 x 512 every plan
lost (41.0 against 35.2). Taking the norm's statistics in ``conv1``'s epilogue as well lost at every
size (166.7 against 161.6 us at 512 px, 129.7 against 119.7 at 256 px: the statistics pass it saves is
cheaper than what the kernel gives up against cuDNN), so ``conv1`` stays with cuDNN."""


@dataclass(frozen=True)
class ConvPlan:
    """How :func:`conv3x3_fused` launches: output tiles of ``block_w`` pixels of one image row times
    ``block_n`` output channels, ``num_warps``, ``stages`` of the software pipeline; ``persistent``: one
    program per SM walking the tiles (else one program per tile), ``flatten``: the tile loop flattened into
    the K loop (persistent plans)."""

    block_w: int = 128
    block_n: int = 128
    num_warps: int = 4
    stages: int = 4
    persistent: bool = False
    flatten: bool = False

    def __post_init__(self) -> None:
        for name in ("block_w", "block_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value!r}")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"stages must be an int >= 1, got {self.stages!r}")
        if self.num_warps not in (4, 8):
            raise ValueError(f"num_warps must be 4 or 8 (one or two warpgroups), got {self.num_warps!r}")
        if self.flatten and not self.persistent:
            raise ValueError("flatten applies to persistent plans only")

    def tiles(self, n: int, h: int, w: int, co: int) -> int:
        """Output tiles of an ``(n, co, h, w)`` result."""
        return n * h * triton.cdiv(w, self.block_w) * triton.cdiv(co, self.block_n)


def plan_conv(width: int) -> ConvPlan:
    """The plan for maps ``width`` pixels wide (H100, fp16, the fastest plans of
    ``bench/bench_implicit_conv.py`` / ``bench/probe_implicit_conv.py`` at the kl-f8 decoder's shapes):
    256-pixel tiles from 256 pixels, 128-pixel tiles from 128, else 64; one program per tile."""
    if width >= 256:
        return ConvPlan(block_w=256, block_n=128, num_warps=8, stages=3)
    if width >= 128:
        return ConvPlan(block_w=128, block_n=128, num_warps=4, stages=4)
    return ConvPlan(block_w=64, block_n=128, num_warps=4, stages=4)


def _input_reason(x: Tensor, weight_dtype: torch.dtype) -> str | None:
    """Why the kernels cannot read ``x`` (with weights of ``weight_dtype``) on its device, or None."""
    if triton is None or TensorDescriptor is None:
        return "Triton with TensorDescriptor (>= 3.4) is not available"
    if x.is_cuda:
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return "the GPU is older than Hopper (compute capability 9.0: no TMA)"
    elif not _interpreting():
        return "x is not on a CUDA device (and the Triton interpreter is off)"
    if not _channels_last_map(x):
        return "x is not a 4-D channels_last map"
    if x.dtype not in (torch.float16, torch.bfloat16) or weight_dtype != x.dtype:
        return "x and the weight are not fp16 / bf16 of one dtype"
    if not x.is_cuda and x.dtype == torch.bfloat16:
        return INTERPRETER_BF16
    return None


INTERPRETER_BF16 = (
    "the Triton interpreter multiplies bf16 tl.dot operands wrongly (as their bit patterns): run the "
    "convolution kernels on fp16 there, or on a GPU"
)


def _channels_last_map(x: Tensor) -> bool:
    """A 4-D map whose memory is channels_last (also when it is contiguous too: 1 x 1 maps, one channel)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _check_input(x: Tensor, what: str) -> None:
    if not _channels_last_map(x):
        raise ValueError(
            f"{what}: x must be a 4-D channels_last map, got shape {tuple(x.shape)}, strides {x.stride()}"
        )
    if not x.is_cuda and x.dtype == torch.bfloat16:
        raise ValueError(f"{what}: {INTERPRETER_BF16}")


def upsample_conv_fits(x: Tensor, weight: Tensor) -> str | None:
    """Why :func:`upsample_conv_fused` cannot run the 3x3 ``weight`` after a 2x upsampling of ``x``, or
    None."""
    reason = _input_reason(x, weight.dtype)
    if reason is None and (weight.shape[1] % BLOCK_K or weight.shape[0] % 8):
        return f"input channels not a multiple of {BLOCK_K} or output channels not a multiple of 8"
    return reason


def fused_conv_fits(x: Tensor, conv: nn.Conv2d) -> str | None:
    """Why :func:`conv3x3_fused` cannot run ``conv`` on an input like ``x`` (its device, dtype and layout;
    the channel counts are ``conv``'s), or None."""
    reason = _input_reason(x, conv.weight.dtype)
    if reason is not None:
        return reason
    if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1):
        return "not a 3x3 convolution with stride 1 and padding 1"
    if conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return "dilated, grouped or not zero-padded"
    if conv.in_channels % BLOCK_K or conv.out_channels % 8:
        return f"input channels not a multiple of {BLOCK_K} or output channels not a multiple of 8"
    return None


def stats_fit(channels: int, groups: int) -> bool:
    """Whether the statistics of ``channels`` outputs in ``groups`` groups can be merged: a power-of-two
    channel count per group (the merge kernel's tile)."""
    if groups < 1 or channels % groups:
        return False
    cg = channels // groups
    return not cg & (cg - 1)


def handoff_groups(handoff: NormHandoff | None, shape: tuple[int, ...]) -> int | None:
    """The group count a kernel writing a map of ``shape`` for ``handoff``'s norm should take statistics
    for (:func:`~ldm_sdk.accel.norm_handoff.wants_stats`, and groups these kernels can merge), or None."""
    if handoff is None or not wants_stats(handoff, shape) or not stats_fit(shape[1], handoff.groups):
        return None
    return handoff.groups


def _stats_layout(channels: int, groups: int) -> None:
    if not stats_fit(channels, groups):
        raise ValueError(
            f"stats_groups must divide the {channels} output channels into groups of a power-of-two "
            f"channel count, got {groups}"
        )


def conv3x3_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    residual: Tensor | None = None,
    residual_bias: Tensor | None = None,
    stats_groups: int | None = None,
    plan: ConvPlan | None = None,
    sms: int | None = None,
    recorder: KernelRecorder | None = None,
) -> tuple[Tensor, GroupNormStats | None]:
    """``(conv3x3(x, weight) + bias) + (residual + residual_bias)`` (see the module doc), and with
    ``stats_groups`` the statistics of the result for a GroupNorm of that many groups under its default
    launch plan. ``x``: channels_last ``(N, C, H, W)``; ``weight`` ``(CO, C, 3, 3)`` (channels_last keeps its
    tap-major matrix a view); ``residual``: channels_last ``(N, CO, H, W)``; biases ``(CO,)``. ``plan``:
    default :func:`plan_conv`; ``sms``: programs of a persistent plan at most (default the SM count)."""
    if TensorDescriptor is None or triton is None:
        raise RuntimeError("conv3x3_fused needs Triton with TensorDescriptor (>= 3.4)")
    _check_input(x, "conv3x3_fused")
    n, c, h, w = x.shape
    co = weight.shape[0]
    if (
        weight.shape != (co, c, 3, 3)
        or weight.dtype != x.dtype
        or x.dtype not in (torch.float16, torch.bfloat16)
    ):
        raise ValueError(
            f"weight must be ({co}, {c}, 3, 3) of x's dtype, fp16 or bf16; got {tuple(weight.shape)} "
            f"{weight.dtype} for x {x.dtype}"
        )
    if c % BLOCK_K or co % 8:
        raise ValueError(f"C must be a multiple of {BLOCK_K} and CO of 8, got C={c}, CO={co}")
    if residual is not None and (residual.shape != (n, co, h, w) or not _channels_last_map(residual)):
        raise ValueError(
            f"residual must be a channels_last ({n}, {co}, {h}, {w}) map, got {tuple(residual.shape)} "
            f"with strides {residual.stride()}"
        )
    for name, vec in (("bias", bias), ("residual_bias", residual_bias)):
        if vec is not None and vec.shape != (co,):
            raise ValueError(f"{name} must have shape ({co},), got {tuple(vec.shape)}")
    if residual_bias is not None and residual is None:
        raise ValueError("residual_bias is given without a residual")
    plan = plan or plan_conv(w)
    if stats_groups is not None:
        _stats_layout(co, stats_groups)
    out = torch.empty((n, co, h, w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out, None
    w2 = weight.permute(0, 2, 3, 1).reshape(
        co, 9 * c
    )  # (CO, 9C), tap-major: a view of a channels_last weight
    x_desc = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), [1, 1, plan.block_w, BLOCK_K])
    w_desc = TensorDescriptor.from_tensor(w2, [plan.block_n, BLOCK_K])
    y_desc = TensorDescriptor.from_tensor(out.permute(0, 2, 3, 1), [1, 1, plan.block_w, plan.block_n])
    tiles = plan.tiles(n, h, w, co)
    programs = tiles
    if plan.persistent:
        if sms is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        programs = max(1, min(sms, tiles))
    per_sample = h * triton.cdiv(w, plan.block_w)
    mean, m2, count = _partials(out, n * per_sample, stats_groups)
    r_desc = y_desc
    if residual is not None:
        r_desc = TensorDescriptor.from_tensor(
            residual.permute(0, 2, 3, 1), [1, 1, plan.block_w, plan.block_n]
        )
    launch(
        _conv3x3_fused_kernel,
        (programs,),
        recorder,
        x_desc,
        w_desc,
        y_desc,
        r_desc,
        bias if bias is not None else out,
        residual_bias if residual_bias is not None else out,
        mean,
        m2,
        count,
        n,
        h,
        w,
        c,
        co,
        programs,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_RBIAS=residual_bias is not None,
        STATS=stats_groups is not None,
        BF16=x.dtype == torch.bfloat16,
        BLOCK_W=plan.block_w,
        BLOCK_N=plan.block_n,
        BLOCK_K=BLOCK_K,
        FLATTEN=plan.flatten,
        STAGES=plan.stages,
        num_warps=plan.num_warps,
    )
    return out, _merged(out, (mean, m2, count), stats_groups, per_sample, recorder)


def upsample_conv_fused(
    x: Tensor,
    phase_weight: Tensor,
    bias: Tensor | None = None,
    *,
    stats_groups: int | None = None,
    plan: ConvPlan | None = None,
    recorder: KernelRecorder | None = None,
) -> tuple[Tensor, GroupNormStats | None]:
    """Nearest 2x upsampling + 3x3 convolution + ``bias`` of a channels_last ``x`` ``(N, C, H, W)`` in the
    sub-pixel form, as one kernel writing the channels_last ``(N, CO, 2H, 2W)`` output (with
    ``stats_groups``: and its statistics, as :func:`conv3x3_fused`). ``phase_weight``: the four phases'
    2x2 kernels as one ``(4 CO, C, 2, 2)`` convolution weight, phase ``2a + b`` major
    (:func:`ldm_sdk.accel.subpixel.phase_kernels`; channels_last keeps its matrix a view). ``plan``:
    default :func:`plan_conv` of ``W`` (one program per tile; ``persistent`` plans are refused)."""
    if TensorDescriptor is None or triton is None:
        raise RuntimeError("upsample_conv_fused needs Triton with TensorDescriptor (>= 3.4)")
    _check_input(x, "upsample_conv_fused")
    n, c, h, w = x.shape
    co = phase_weight.shape[0] // 4
    if phase_weight.shape != (4 * co, c, 2, 2) or phase_weight.dtype != x.dtype:
        raise ValueError(
            f"phase_weight must be (4 CO, {c}, 2, 2) of x's dtype {x.dtype}, got {tuple(phase_weight.shape)} "
            f"{phase_weight.dtype}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16) or c % BLOCK_K or co % 8:
        raise ValueError(
            f"x must be fp16 / bf16 with C a multiple of {BLOCK_K}, CO a multiple of 8; got {x.dtype}, "
            f"C={c}, CO={co}"
        )
    if bias is not None and bias.shape != (co,):
        raise ValueError(f"bias must have shape ({co},), got {tuple(bias.shape)}")
    plan = plan or plan_conv(w)
    if plan.persistent:
        raise ValueError("upsample_conv_fused runs one program per tile: pass a plan with persistent=False")
    if stats_groups is not None:
        _stats_layout(co, stats_groups)
    out = torch.empty(
        (n, co, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last
    )
    if out.numel() == 0:
        return out, None
    w2 = phase_weight.permute(0, 2, 3, 1).reshape(4 * co, 4 * c)
    x_desc = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), [1, 1, plan.block_w, BLOCK_K])
    w_desc = TensorDescriptor.from_tensor(w2, [plan.block_n, BLOCK_K])
    # the big map as (N H, 2, W, 2, CO): output pixel (2i + a, 2j + b) at [n H + i, a, j, b]
    big = out.permute(0, 2, 3, 1).reshape(n * h, 2, w, 2, co)
    y_desc = TensorDescriptor.from_tensor(big, [1, 1, plan.block_w, 1, plan.block_n])
    per_sample = 4 * h * triton.cdiv(w, plan.block_w)
    mean, m2, count = _partials(out, n * per_sample, stats_groups)
    launch(
        _subpixel_conv_kernel,
        (n * per_sample * triton.cdiv(co, plan.block_n),),
        recorder,
        x_desc,
        w_desc,
        y_desc,
        bias if bias is not None else out,
        mean,
        m2,
        count,
        n,
        h,
        w,
        c,
        co,
        HAS_BIAS=bias is not None,
        STATS=stats_groups is not None,
        BF16=x.dtype == torch.bfloat16,
        BLOCK_W=plan.block_w,
        BLOCK_N=plan.block_n,
        BLOCK_K=BLOCK_K,
        STAGES=plan.stages,
        num_warps=plan.num_warps,
    )
    return out, _merged(out, (mean, m2, count), stats_groups, per_sample, recorder)


def _partials(out: Tensor, tiles: int, stats_groups: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' per-column statistics buffers (mean, M2, count) for ``tiles`` output tiles per column of
    ``out``, or ``out`` three times (dummy pointers) without statistics."""
    if stats_groups is None:
        return out, out, out
    partials = torch.empty((3, tiles * out.shape[1]), device=out.device, dtype=torch.float32)
    return partials[0], partials[1], partials[2]


def _merged(
    out: Tensor,
    partials: tuple[Tensor, Tensor, Tensor],
    stats_groups: int | None,
    per_sample: int,
    recorder: KernelRecorder | None,
) -> GroupNormStats | None:
    """:func:`merge_partials` of the kernels' buffers, or None without statistics."""
    if stats_groups is None:
        return None
    return merge_partials(*partials, out, stats_groups, per_sample, recorder)


def merge_partials(
    mean: Tensor,
    m2: Tensor,
    count: Tensor,
    out: Tensor,
    groups: int,
    per_sample: int,
    recorder: KernelRecorder | None = None,
) -> GroupNormStats:
    """The per-column partials of ``out``'s ``per_sample`` tiles per sample merged per (sample, group) into
    the slot layout of the launch plan ``group_norm_act`` makes for ``out`` (the merged values in the first
    slot of each group, the others empty)."""
    plan = default_plan(out, groups)
    slots = plan.parts * plan.stats.split
    co = out.shape[1]
    merged = torch.empty((3, out.shape[0] * groups * slots), device=out.device, dtype=torch.float32)
    launch(
        _merge_partials_kernel,
        (out.shape[0] * groups,),
        recorder,
        mean,
        m2,
        count,
        merged[0],
        merged[1],
        merged[2],
        per_sample,
        co,
        slots,
        CG=co // groups,
        BLOCK_T=max(1, min(4096 // (co // groups), _pow2(per_sample))),
        BLOCK_SLOTS=max(2, _pow2(slots)),
        num_warps=4,
    )
    return GroupNormStats(plan, merged[0], merged[1], merged[2])


if triton is not None:
    from ldm_sdk.kernels.implicit_conv import (
        _conv3x3_fused_kernel,
        _merge_partials_kernel,
        _subpixel_conv_kernel,
    )


__all__ = [
    "BLOCK_K",
    "EPILOGUE_MIN_WIDTH",
    "ConvPlan",
    "conv3x3_fused",
    "fused_conv_fits",
    "handoff_groups",
    "merge_partials",
    "plan_conv",
    "stats_fit",
    "upsample_conv_fits",
    "upsample_conv_fused",
]
