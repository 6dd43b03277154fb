"""The implicit-GEMM 3x3 convolution with the residual block's epilogue (``ldm_sdk.accel.implicit_conv``), its
use for the decoder's ``conv2`` in :class:`~ldm_sdk.accel.block_fusion.FusedResnetBlock`, and the sub-pixel
upsampling kernel beside it.

The independent references are torch float32 maths: ``F.conv2d`` of the float32 operands plus the float32
bias / residual / residual bias for the output, float64 means and sums of squared deviations of the stored
output per (sample, group) for the statistics, :func:`~ldm_sdk.accel.triton_kernels.group_norm_act_reference`
of the float32 output for the norm that takes them, and the unfused ``ResnetBlock`` in float32 for the block.

CPU, in this process (no kernel runs): the plan rule and :class:`ConvPlan`'s validation, what
:func:`fused_conv_fits` accepts (CPU tensors only with ``TRITON_INTERPRET`` on) and why it refuses the
rest, :func:`stats_fit`, the argument errors of :func:`conv3x3_fused`, and its launches as a recorder sees
them (grid, programs, the merge launch, the statistics' plan).

Through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, so
:func:`test_kernels_in_the_interpreter` runs this file as a script in a subprocess; fresh buffers NaN-filled
so an unwritten tile or slot fails), fp16 only -- the interpreter multiplies bf16 ``tl.dot`` operands as
their bit patterns (:mod:`ldm_sdk.accel.geglu_tma`), so bf16 numerics are left to the GPU tests
(``test_implicit_conv_gpu.py``):

* ``kernel`` (one subprocess), ``conv`` cases: the output, channels_last and of ``x``'s dtype, within one
  output ulp plus float32 noise of the float32 reference (:func:`compare_ulps`), with and without bias /
  residual / residual bias, N = 1 and 2, C = 64 / 128, CO = 8 / 16 / 32 / 48, maps narrower than, a
  multiple of and not a multiple of the tile, column tiles cut by CO, per-tile and persistent (nested and
  flattened) plans with fewer programs than tiles, an NCHW weight and float32 biases; ``stats`` cases: for
  every (sample, group) slot 0 holds the group's count, mean and M2 of the stored output and the other
  slots are empty, under the norm's default plan (groups of 1 to 32 channels, groups spanning column
  tiles, a plan of two chunks); ``group_norm_act_triton(stats=...)`` within one ulp of the float32
  reference and of the norm computing its own statistics;
* ``block``: a fused fp16 channels_last ``ResnetBlock`` (64 -> 64, and 128 -> 64 with a ``nin_shortcut``)
  takes the implicit ``conv2`` once ``EPILOGUE_MIN_WIDTH`` admits its map, and matches the float32 block as
  closely as the unfused fp16 block does; feeding a norm through a ``NormHandoff`` it offers its output's
  statistics, which the next ``FusedGroupNorm`` takes (``taken``) with the result of its own statistics to
  one ulp; ``implicit_conv = False`` and narrow maps keep the cuDNN path;
* ``upsample``: ``upsample_conv_fused`` (nearest 2x upsampling + 3x3 convolution in the sub-pixel form,
  written into the big map) within one output ulp plus float32 noise of the float64 phases' convolution
  interleaved (the phase kernels rounded to fp16 once, as the fast path forms them) + bias, its statistics
  against torch's of its output, and ``upsample_conv`` taking it from ``SUBPIXEL_MIN_WIDTH`` on, the cuDNN
  form below.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel import implicit_conv as IC
from ldm_sdk.accel.implicit_conv import (
    ConvPlan,
    conv3x3_fused,
    fused_conv_fits,
    stats_fit,
    upsample_conv_fused,
)
from ldm_sdk.accel.triton_kernels import (
    KernelRecorder,
    TensorDescriptor,
    compare_ulps,
    default_plan,
    group_norm_act_reference,
    group_norm_act_triton,
    triton_available,
)
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

CL = torch.channels_last
SMALL = ConvPlan(block_w=16, block_n=16, num_warps=4, stages=2)
FLAT = ConvPlan(block_w=32, block_n=32, num_warps=4, stages=2, persistent=True, flatten=True)
NESTED = ConvPlan(block_w=16, block_n=32, num_warps=8, stages=1, persistent=True)
EPS = 1e-6

needs_tma = pytest.mark.skipif(
    not triton_available() or TensorDescriptor is None, reason="needs Triton with TensorDescriptor"
)


@dataclass(frozen=True)
class ConvCase:
    """One conv3x3_fused call: ``(n, c, h, w)`` input, ``co`` outputs, which epilogue terms, the plan."""

    name: str
    n: int
    c: int
    co: int
    h: int
    w: int
    bias: bool = True
    residual: bool = True
    rbias: bool = True
    plan: ConvPlan = SMALL
    sms: int | None = None
    weight_cl: bool = True
    bias_dtype: torch.dtype | None = None  # default: x's dtype


@dataclass(frozen=True)
class Operands:
    x: Tensor
    weight: Tensor
    bias: Tensor | None
    residual: Tensor | None
    rbias: Tensor | None


def operands(case: ConvCase, dtype: torch.dtype = torch.float16, seed: int = 0) -> Operands:
    g = torch.Generator().manual_seed(seed + case.n * 1000 + case.c * 10 + case.co + case.h + case.w)
    x = torch.randn(case.n, case.c, case.h, case.w, generator=g).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(case.co, case.c, 3, 3, generator=g) / (3 * case.c**0.5)).to(dtype)
    weight = weight.contiguous(memory_format=CL) if case.weight_cl else weight.contiguous()
    bias_dtype = case.bias_dtype or dtype
    bias = (0.3 * torch.randn(case.co, generator=g)).to(bias_dtype) if case.bias else None
    residual = None
    if case.residual:
        residual = torch.randn(case.n, case.co, case.h, case.w, generator=g).to(dtype)
        residual = residual.contiguous(memory_format=CL)
    rbias = (0.2 * torch.randn(case.co, generator=g)).to(bias_dtype) if case.rbias else None
    return Operands(x, weight, bias, residual, rbias)


def conv_reference(ops: Operands) -> Tensor:
    """``(conv(x, w) + bias) + (residual + residual_bias)`` in float32, not rounded."""
    bias = ops.bias.float() if ops.bias is not None else None
    out = F.conv2d(ops.x.float(), ops.weight.float(), bias, padding=1)
    if ops.residual is not None:
        residual = ops.residual.float()
        if ops.rbias is not None:
            residual = residual + ops.rbias.float()[:, None, None]
        out = out + residual
    return out


def run_case(case: ConvCase, ops: Operands, **kwargs: Any) -> tuple[Tensor, Any]:
    return conv3x3_fused(
        ops.x,
        ops.weight,
        ops.bias,
        residual=ops.residual,
        residual_bias=ops.rbias,
        plan=case.plan,
        sms=case.sms,
        **kwargs,
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# -- plans ---------------------------------------------------------------------------------------------------
def test_plan_rule() -> None:
    assert IC.plan_conv(512) == ConvPlan(block_w=256, block_n=128, num_warps=8, stages=3)
    assert IC.plan_conv(256).block_w == 256 and IC.plan_conv(255).block_w == 128
    assert IC.plan_conv(128) == ConvPlan() and IC.plan_conv(127).block_w == 64
    assert IC.plan_conv(6).block_w == 64
    assert not any(IC.plan_conv(w).persistent for w in (8, 128, 1024))
    # N x H x ceil(W / block_w) x ceil(CO / block_n)
    assert SMALL.tiles(2, 3, 20, 48) == 2 * 3 * 2 * 3 and FLAT.tiles(1, 3, 40, 32) == 3 * 2 * 1
    assert IC.EPILOGUE_MIN_WIDTH == 256 and IC.BLOCK_K == 64


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"block_w": 24}, "must be a power of two >= 16"),
        ({"block_w": 8}, "must be a power of two >= 16"),
        ({"block_n": 96}, "must be a power of two >= 16"),
        ({"block_n": True}, "must be a power of two >= 16"),
        ({"num_warps": 2}, "num_warps must be 4 or 8"),
        ({"num_warps": 16}, "num_warps must be 4 or 8"),
        ({"stages": 0}, "stages must be an int >= 1"),
        ({"flatten": True}, "flatten applies to persistent plans only"),
    ],
    ids=["w24", "w8", "n96", "n_bool", "warps2", "warps16", "stages0", "flatten_alone"],
)
def test_plan_validation(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ConvPlan(**kwargs)  # type: ignore[arg-type]


# -- where it runs -------------------------------------------------------------------------------------------
def _map(c: int = 64, dtype: torch.dtype = torch.float16, cl: bool = True) -> Tensor:
    x = torch.zeros(1, c, 4, 6, dtype=dtype)
    return x.contiguous(memory_format=CL) if cl else x


def _conv(c: int = 64, co: int = 32, dtype: torch.dtype = torch.float16, **kwargs: Any) -> nn.Conv2d:
    options = {"kernel_size": 3, "padding": 1, **kwargs}
    return nn.Conv2d(c, co, **options).to(dtype)  # type: ignore[arg-type]


@needs_tma
@pytest.mark.parametrize(("c", "co"), [(64, 32), (128, 8), (192, 48)])
def test_fits_a_plain_half_precision_conv_under_the_interpreter(
    monkeypatch: pytest.MonkeyPatch, c: int, co: int
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_conv_fits(_map(c), _conv(c, co)) is None
    assert fused_conv_fits(_map(c), _conv(c, co).to(memory_format=CL)) is None
    # a 1 x 1 map is channels_last and contiguous at once: taken
    assert fused_conv_fits(torch.zeros(1, c, 1, 1, dtype=torch.float16), _conv(c, co)) is None
    # bf16 products are wrong in the interpreter: refused there, with the reason
    reason = fused_conv_fits(_map(c, torch.bfloat16), _conv(c, co, torch.bfloat16))
    assert reason is not None and "interpreter multiplies bf16" in reason
    with pytest.raises(ValueError, match="interpreter multiplies bf16"):
        conv3x3_fused(_map(c, torch.bfloat16), _conv(c, co, torch.bfloat16).weight.detach())


@needs_tma
@pytest.mark.parametrize(
    ("x", "conv", "words"),
    [
        (_map(), _conv(stride=2), "stride 1 and padding 1"),
        (_map(), _conv(padding=0), "stride 1 and padding 1"),
        (_map(), _conv(kernel_size=1, padding=0), "not a 3x3"),
        (_map(), _conv(groups=2), "dilated, grouped or not zero-padded"),
        (_map(), _conv(dilation=2), "dilated, grouped or not zero-padded"),
        (_map(), _conv(padding_mode="reflect"), "dilated, grouped or not zero-padded"),
        (_map(96), _conv(96), "input channels not a multiple of 64"),
        (_map(), _conv(co=20), "output channels not a multiple of 8"),
        (_map(cl=False), _conv(), "not a 4-D channels_last map"),
        (_map()[0], _conv(), "not a 4-D channels_last map"),
        (_map(dtype=torch.float32), _conv(dtype=torch.float32), "not fp16 / bf16"),
        (_map(), _conv(dtype=torch.float32), "not fp16 / bf16 of one dtype"),
        (_map(dtype=torch.bfloat16), _conv(), "not fp16 / bf16 of one dtype"),
    ],
    ids=[
        "stride2",
        "padding0",
        "kernel1",
        "groups2",
        "dilation2",
        "reflect",
        "c96",
        "co20",
        "nchw",
        "3d",
        "float32",
        "weight_float32",
        "bf16_x_fp16_weight",
    ],
)
def test_fits_says_why_not(monkeypatch: pytest.MonkeyPatch, x: Tensor, conv: nn.Conv2d, words: str) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = fused_conv_fits(x, conv)
    assert why is not None and words in why, why


@needs_tma
def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = fused_conv_fits(_map(), _conv())
    assert why is not None and "not on a CUDA device" in why, why


@pytest.mark.parametrize(
    ("channels", "groups", "fits"),
    [
        *[(32, 8, True), (64, 32, True), (64, 64, True), (64, 1, True), (48, 3, True), (96, 3, True)],
        *[(48, 16, False), (32, 3, False), (32, 0, False), (32, 64, False), (96, 32, False), (96, 8, False)],
    ],
)
def test_stats_fit(channels: int, groups: int, fits: bool) -> None:
    assert stats_fit(channels, groups) is fits


# -- argument errors (raised before anything launches) -------------------------------------------------------
def _errors() -> list[tuple[str, Callable[[], object], str]]:
    case = ConvCase("errors", 1, 64, 16, 3, 5)
    ops = operands(case)
    x, w, b, r, rb = ops.x, ops.weight, ops.bias, ops.residual, ops.rbias
    x32 = torch.zeros(1, 32, 3, 5, dtype=torch.float16).contiguous(memory_format=CL)
    w32 = torch.zeros(16, 32, 3, 3, dtype=torch.float16)
    w12 = torch.zeros(12, 64, 3, 3, dtype=torch.float16)
    w48 = torch.zeros(48, 64, 3, 3, dtype=torch.float16)
    return [
        ("x_nchw", lambda: conv3x3_fused(x.contiguous(), w), "x must be a 4-D channels_last map"),
        ("x_3d", lambda: conv3x3_fused(x[0], w), "x must be a 4-D channels_last map"),
        ("c_32", lambda: conv3x3_fused(x32, w32), "C must be a multiple of 64"),
        ("co_12", lambda: conv3x3_fused(x, w12), "CO of 8, got C=64, CO=12"),
        ("weight_float32", lambda: conv3x3_fused(x, w.float()), r"of x's dtype, fp16 or bf16"),
        ("weight_bf16", lambda: conv3x3_fused(x, w.bfloat16()), r"of x's dtype, fp16 or bf16"),
        ("weight_1x1", lambda: conv3x3_fused(x, w[:, :, :1, :1]), r"weight must be \(16, 64, 3, 3\)"),
        ("weight_c128", lambda: conv3x3_fused(x, torch.cat([w, w], 1)), r"weight must be \(16, 64, 3, 3\)"),
        ("x_float32", lambda: conv3x3_fused(x.float(), w.float()), "fp16 or bf16"),
        ("residual_shape", lambda: conv3x3_fused(x, w, residual=r[:, :8]), "residual must be a channels_l"),
        (
            "residual_nchw",
            lambda: conv3x3_fused(x, w, residual=r.contiguous()),  # type: ignore[union-attr]
            r"residual must be a channels_last \(1, 16, 3, 5\)",
        ),
        ("rbias_alone", lambda: conv3x3_fused(x, w, b, residual_bias=rb), "without a residual"),
        ("bias_shape", lambda: conv3x3_fused(x, w, b[:8]), r"bias must have shape \(16,\)"),  # type: ignore[index]
        ("bias_2d", lambda: conv3x3_fused(x, w, b[None]), r"bias must have shape \(16,\)"),  # type: ignore[index]
        (
            "rbias_shape",
            lambda: conv3x3_fused(x, w, residual=r, residual_bias=rb[:4]),  # type: ignore[index]
            r"residual_bias must have shape \(16,\)",
        ),
        ("groups_3", lambda: conv3x3_fused(x, w, stats_groups=3), "stats_groups must divide the 16"),
        ("groups_0", lambda: conv3x3_fused(x, w, stats_groups=0), "stats_groups must divide the 16"),
        ("groups_32", lambda: conv3x3_fused(x, w, stats_groups=32), "stats_groups must divide the 16"),
        ("cg_3", lambda: conv3x3_fused(x, w48, stats_groups=16), "power-of-two channel count, got 16"),
    ]


@needs_tma
@pytest.mark.parametrize("case", range(len(_errors())), ids=[name for name, _, _ in _errors()])
def test_argument_errors_say_what_is_valid(case: int) -> None:
    _, call, words = _errors()[case]
    with torch.no_grad(), pytest.raises(ValueError, match=words):
        call()


# -- launches, as a recorder sees them (no kernel runs) ------------------------------------------------------
@needs_tma
@pytest.mark.parametrize(
    ("case", "groups", "programs"),
    [
        (ConvCase("per_tile", 2, 64, 48, 3, 20), None, 2 * 3 * 2 * 3),
        (ConvCase("per_tile_stats", 2, 64, 48, 3, 20), 3, 2 * 3 * 2 * 3),
        (ConvCase("persistent", 1, 128, 32, 3, 40, plan=FLAT, sms=3), 8, 3),
        (ConvCase("more_sms_than_tiles", 1, 64, 16, 2, 20, plan=NESTED, sms=64), None, 2 * 2),
    ],
    ids=lambda v: v.name if isinstance(v, ConvCase) else None,
)
def test_launches(case: ConvCase, groups: int | None, programs: int) -> None:
    ops = operands(case)
    recorder = KernelRecorder()
    with unwritten_memory_is_nan(), torch.no_grad():
        out, stats = run_case(case, ops, stats_groups=groups, recorder=recorder)
    assert out.shape == (case.n, case.co, case.h, case.w) and out.is_contiguous(memory_format=CL)
    assert out.dtype == ops.x.dtype and torch.isnan(out).all()  # recorded, not run
    assert len(recorder) == (1 if groups is None else 2)
    conv = recorder.launches[0]
    assert conv.grid == (programs,) and conv.args[-1] == programs
    assert conv.kwargs["BLOCK_W"] == case.plan.block_w and conv.kwargs["BLOCK_N"] == case.plan.block_n
    assert conv.kwargs["FLATTEN"] == case.plan.flatten and conv.kwargs["num_warps"] == case.plan.num_warps
    assert conv.kwargs["STATS"] == (groups is not None) and not conv.kwargs["BF16"]
    flags = (conv.kwargs["HAS_BIAS"], conv.kwargs["HAS_RESIDUAL"], conv.kwargs["HAS_RBIAS"])
    assert flags == (case.bias, case.residual, case.rbias)
    if groups is None:
        assert stats is None
    else:
        assert stats is not None and stats.plan == default_plan(out, groups)
        assert recorder.launches[1].grid == (case.n * groups,)


# -- the kernels through the Triton interpreter --------------------------------------------------------------
CONV_CASES = [
    ConvCase("n1_c64_co16_w20_bias", 1, 64, 16, 3, 20, residual=False, rbias=False),
    ConvCase("n2_c128_co48_w32_all", 2, 128, 48, 2, 32),
    ConvCase("n2_c64_co32_w21_residual", 2, 64, 32, 3, 21, bias=False, rbias=False),
    ConvCase("n2_c64_co32_w7_narrower_than_the_tile", 2, 64, 32, 3, 7, rbias=False),
    ConvCase("n1_c64_co8_w17_fewer_co_than_block_n", 1, 64, 8, 2, 17),
    ConvCase("n1_c128_co32_w40_flat_sms3", 1, 128, 32, 3, 40, plan=FLAT, sms=3),
    ConvCase("n2_c64_co48_w32_flat_sms3_plain", 2, 64, 48, 2, 32, False, False, False, plan=FLAT, sms=3),
    ConvCase("n2_c64_co48_w20_nested_sms3", 2, 64, 48, 2, 20, plan=NESTED, sms=3),
    ConvCase("n1_c64_co16_w20_nchw_weight", 1, 64, 16, 2, 20, weight_cl=False),
    ConvCase("n1_c64_co16_w20_float32_biases", 1, 64, 16, 2, 20, bias_dtype=torch.float32),
]


def check_conv(case: ConvCase) -> None:
    ops = operands(case)
    out, stats = run_case(case, ops)
    assert stats is None, case.name
    assert out.shape == (case.n, case.co, case.h, case.w) and out.dtype == ops.x.dtype, case.name
    assert out.is_contiguous(memory_format=CL), f"{case.name}: strides {out.stride()}"
    report = compare_ulps(out, conv_reference(ops))
    assert report.within_bound, f"{case.name}: {report}"


@dataclass(frozen=True)
class StatsCase:
    conv: ConvCase
    groups: int


STATS_CASES = [
    StatsCase(ConvCase("co32_g8", 2, 64, 32, 3, 20), 8),  # 4 channels a group, a partial row tile
    StatsCase(ConvCase("co64_g32", 1, 128, 64, 2, 20), 32),  # 2 channels a group
    StatsCase(ConvCase("co64_g2_groups_span_column_tiles", 1, 64, 64, 2, 16, rbias=False), 2),
    StatsCase(ConvCase("co48_g3_partial_column_tile", 2, 64, 48, 2, 20, plan=ConvPlan(16, 32, 4, 2)), 3),
    StatsCase(ConvCase("co32_g8_two_chunks_flat", 1, 64, 32, 6, 40, plan=FLAT, sms=3), 8),
    StatsCase(ConvCase("co16_g16_one_channel", 1, 64, 16, 3, 9, bias=False, residual=False, rbias=False), 16),
]


def check_stats(case: StatsCase) -> None:
    name, groups = case.conv.name, case.groups
    ops = operands(case.conv, seed=7)
    out, stats = run_case(case.conv, ops, stats_groups=groups)
    assert compare_ulps(out, conv_reference(ops)).within_bound, name
    assert stats is not None and stats.plan == default_plan(out, groups), name
    n, co, h, w = out.shape
    slots = stats.plan.parts * stats.plan.stats.split
    if name.startswith("co32_g8_two_chunks"):
        assert slots == 2, stats.plan  # the case is meant to leave a slot empty
    for part in (stats.mean, stats.m2, stats.count):
        assert part.shape == (n * groups * slots,) and part.dtype == torch.float32, name
    values = out.double().reshape(n, groups, -1)  # logical (N, C, H, W) order: a group's channels together
    mean = values.mean(-1)
    m2 = ((values - mean[..., None]) ** 2).sum(-1)
    got_mean, got_m2, got_count = (p.view(n, groups, slots) for p in (stats.mean, stats.m2, stats.count))
    assert torch.all(got_count[..., 0] == h * w * (co // groups)), (name, got_count[..., 0])
    for other in (got_count, got_mean, got_m2):
        assert torch.all(other[..., 1:] == 0), (name, other)
    torch.testing.assert_close(got_mean[..., 0].double(), mean, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got_m2[..., 0].double(), m2, rtol=1e-5, atol=1e-4, msg=name)
    # the norm that takes them
    g = torch.Generator().manual_seed(co + groups)
    weight = (1 + 0.2 * torch.randn(co, generator=g)).half()
    bias = (0.2 * torch.randn(co, generator=g)).half()
    fed = group_norm_act_triton(out, weight, bias, groups, EPS, "silu", stats=stats)
    own = group_norm_act_triton(out, weight, bias, groups, EPS, "silu", single_pass=False)
    ref = group_norm_act_reference(out.float(), weight.float(), bias.float(), groups, EPS, "silu")
    assert fed.is_contiguous(memory_format=CL) and fed.dtype == torch.float16, name
    report = compare_ulps(fed, ref)
    assert report.within_bound, f"{name}: the norm fed the statistics vs the float32 reference: {report}"
    report = compare_ulps(fed, own)
    assert report.within_bound, f"{name}: the norm fed the statistics vs its own statistics: {report}"


def fused_resnet_block(cin: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(float32 block, the same in fp16 channels_last, that fused with the Triton backend)."""
    from ldm_sdk.accel import fuse_blocks, fuse_model
    from ldm_sdk.accel.block_fusion import FusedResnetBlock
    from ldm_sdk.benchmarks.common import randomize_
    from ldm_sdk.models.autoencoder import ResnetBlock

    plain = ResnetBlock(in_channels=cin, out_channels=64, temb_channels=0).eval().requires_grad_(False)
    randomize_(plain, torch.Generator().manual_seed(cin))
    half = copy.deepcopy(plain).half().to(memory_format=CL)
    fused = copy.deepcopy(half)
    fuse_model(fused, backend="triton")
    report = fuse_blocks(fused, backend="triton")
    assert report.fused == {"ResnetBlock": 1} and type(fused) is FusedResnetBlock, report
    return plain, half, fused


def block_input(cin: int, w: int = 20) -> Tensor:
    x = torch.randn(1, cin, 6, w, generator=torch.Generator().manual_seed(cin + w))
    return x.half().contiguous(memory_format=CL)


class CountedConv:
    """Stands in for ``block_fusion.conv3x3_fused``: records each call's ``stats_groups`` and output."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, Tensor]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out, stats = conv3x3_fused(*args, **kwargs)
        self.calls.append((kwargs.get("stats_groups"), out))
        return out, stats


def check_block(cin: int) -> None:
    from ldm_sdk.accel import block_fusion as BF

    plain, half, fused = fused_resnet_block(cin)
    assert (cin != 64) == hasattr(fused, "nin_shortcut")
    x = block_input(cin)
    counted = CountedConv()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BF, "conv3x3_fused", counted)
        out_default = fused(x)
        assert counted.calls == [], "a 20 pixel wide map took the implicit conv at the default minimum width"
        mp.setattr(BF, "EPILOGUE_MIN_WIDTH", 8)
        out = fused(x)
        assert len(counted.calls) == 1 and counted.calls[0][0] is None, counted.calls
        assert counted.calls[0][1] is out  # the block returns the convolution's output itself
    assert out.shape == (1, 64, 6, 20) and out.dtype == torch.float16 and out.is_contiguous(memory_format=CL)
    truth = plain(x.float())
    err_fused, err_default = rel_err(out, truth), rel_err(out_default, truth)
    err_unfused = rel_err(half(x), truth)
    # test_block_fusion's bound for fused fp16 blocks against the float32 model
    assert err_fused <= 1.2 * err_unfused + 1e-4, f"implicit {err_fused:.3e}, unfused {err_unfused:.3e}"
    assert err_default <= 1.2 * err_unfused + 1e-4, f"cuDNN path {err_default:.3e}, unfused {err_unfused:.3e}"
    assert err_fused < 4e-3


def check_block_handoff() -> None:
    """A block feeding a norm through a NormHandoff (as link_decoder sets it up): the implicit conv takes
    the statistics, the block offers them with its output, and the norm after it takes them."""
    from ldm_sdk.accel import block_fusion as BF
    from ldm_sdk.accel import triton_kernels as K
    from ldm_sdk.accel.fusion import FusedGroupNorm
    from ldm_sdk.accel.norm_handoff import NormHandoff

    _, _, fused = fused_resnet_block(128)
    norm = FusedGroupNorm.from_norm(nn.GroupNorm(32, 64, eps=EPS).half(), act="silu", backend="triton")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
        norm.bias.copy_(0.2 * torch.randn(64, generator=g))
    handoff = NormHandoff(32)
    fused.norm_handoff = handoff
    fused.feeds_norm = True
    norm.norm_handoff = handoff
    offers: list[tuple[Tensor, Any]] = []
    offer = handoff.offer

    def recorded_offer(tensor: Tensor, stats: Any) -> None:
        offers.append((tensor, stats))
        offer(tensor, stats)

    handoff.offer = recorded_offer  # type: ignore[method-assign]
    x = block_input(128)
    counted = CountedConv()
    with pytest.MonkeyPatch.context() as mp:
        # norms of this map would take the single-pass kernel (no statistics pass to save) at the default
        mp.setattr(K, "SINGLE_PASS_MAX", 16)
        mp.setattr(BF, "conv3x3_fused", counted)
        mp.setattr(BF, "EPILOGUE_MIN_WIDTH", 8)
        out = fused(x)
        assert [groups for groups, _ in counted.calls] == [32], counted.calls
        assert len(offers) == 1 and offers[0][0] is out, offers
        stats = offers[0][1]
        assert stats.plan == default_plan(out, 32)
        assert torch.all(stats.count.view(32, -1)[:, 0] == 6 * 20 * 2)
        taken = handoff.taken
        fed = norm(out)
        assert handoff.taken == taken + 1, "the norm did not take the offered statistics"
        own = norm(out)  # no offer left: the norm's own statistics pass
        assert handoff.taken == taken + 1
        explicit = group_norm_act_triton(out, norm.weight, norm.bias, 32, EPS, "silu", single_pass=False)
    assert torch.equal(own, explicit)
    report = compare_ulps(fed, own)
    assert report.within_bound, f"the norm with the conv's statistics vs with its own: {report}"
    ref = group_norm_act_reference(out.float(), norm.weight.float(), norm.bias.float(), 32, EPS, "silu")
    report = compare_ulps(fed, ref)
    assert report.within_bound, f"the norm with the conv's statistics vs the float32 reference: {report}"


def check_block_switched_off() -> None:
    from ldm_sdk.accel import block_fusion as BF

    plain, half, fused = fused_resnet_block(64)
    x = block_input(64)
    counted = CountedConv()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BF, "conv3x3_fused", counted)
        mp.setattr(BF, "EPILOGUE_MIN_WIDTH", 8)
        mp.setattr(BF.FusedResnetBlock, "implicit_conv", False)
        out = fused(x)
    assert counted.calls == []
    truth = plain(x.float())
    assert rel_err(out, truth) <= 1.2 * rel_err(half(x), truth) + 1e-4


def check_upsample(n: int, c: int, co: int, h: int, w: int, groups: int | None, plan: ConvPlan) -> None:
    """``upsample_conv_fused`` against float64 nearest 2x upsampling + 3x3 convolution (the phase kernels
    rounded to fp16 once, as the fast path forms them), its statistics against torch's of its output, and
    ``upsample_conv`` taking it where the map is wide enough."""
    from ldm_sdk.accel import subpixel

    g = torch.Generator().manual_seed(c + co + w)
    x = torch.randn(n, c, h, w, generator=g).half().contiguous(memory_format=CL)
    weight = (torch.randn(co, c, 3, 3, generator=g) / (3 * c**0.5)).half().contiguous(memory_format=CL)
    bias = (0.2 * torch.randn(co, generator=g)).half()
    kernels = subpixel._phase_kernels_triton(weight, None)
    out, stats = upsample_conv_fused(x, kernels, bias, stats_groups=groups, plan=plan)
    assert out.shape == (n, co, 2 * h, 2 * w) and out.is_contiguous(memory_format=CL)
    phases = subpixel.phase_kernels(weight).half().reshape(4 * co, c, 2, 2).double()
    full = F.conv2d(x.double(), phases, None, padding=1)
    ref = torch.empty((n, co, 2 * h, 2 * w), dtype=torch.float64)
    for a in (0, 1):
        for b in (0, 1):
            ref[:, :, a::2, b::2] = full[:, (2 * a + b) * co : (2 * a + b + 1) * co, a : a + h, b : b + w]
    ref = ref + bias.double()[:, None, None]
    report = compare_ulps(out, ref)
    assert report.within_bound, report
    if groups is None:
        assert stats is None
    else:
        assert stats is not None and stats.plan == default_plan(out, groups)
        slots = stats.plan.parts * stats.plan.stats.split
        values = out.double().reshape(n, groups, -1)
        got_mean, got_m2 = stats.mean.view(n, groups, slots)[..., 0], stats.m2.view(n, groups, slots)[..., 0]
        torch.testing.assert_close(got_mean.double(), values.mean(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            got_m2.double(), values.var(-1, unbiased=False) * values.shape[-1], rtol=1e-5, atol=1e-4
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subpixel, "SUBPIXEL_MIN_WIDTH", w)
        taken = subpixel.upsample_conv(x, weight, bias, backend="triton")
        assert torch.equal(taken, upsample_conv_fused(x, kernels, bias)[0])
        mp.setattr(subpixel, "SUBPIXEL_MIN_WIDTH", w + 1)
        cudnn_form = subpixel.upsample_conv(x, weight, bias, backend="triton")
    assert torch.equal(cudnn_form, subpixel.upsample_conv(x, weight, bias, backend="triton", implicit=False))


INTERPRETER_CHECKS: dict[str, dict[str, Callable[[], None]]] = {
    "kernel": {
        **{f"conv {case.name}": (lambda case=case: check_conv(case)) for case in CONV_CASES},
        **{f"stats {case.conv.name}": (lambda case=case: check_stats(case)) for case in STATS_CASES},
    },
    "block": {
        "64_to_64": lambda: check_block(64),
        "128_to_64_nin_shortcut": lambda: check_block(128),
        "norm_handoff": check_block_handoff,
        "implicit_conv_off": check_block_switched_off,
    },
    "upsample": {
        "n2_c64_co16_partial_row_tile": lambda: check_upsample(2, 64, 16, 3, 10, 4, ConvPlan(16, 16, 4, 2)),
        "n1_c128_co32_no_stats": lambda: check_upsample(1, 128, 32, 4, 8, None, ConvPlan(16, 32, 4, 2)),
        "n1_c64_co48_g3": lambda: check_upsample(1, 64, 48, 2, 5, 3, ConvPlan(16, 32, 4, 2)),
    },
}


def interpreter_checks(group: str) -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    with unwritten_memory_is_nan(), torch.no_grad():
        for name, check in INTERPRETER_CHECKS[group].items():
            check()
            done.append(name)
    return done


@pytest.mark.skipif(not triton_available() or TensorDescriptor is None, reason="needs Triton (>= 3.4)")
@pytest.mark.parametrize("group", list(INTERPRETER_CHECKS))
def test_kernels_in_the_interpreter(group: str) -> None:
    done = run_interpreted(__file__, "--interpreter-checks", group)
    assert done == list(INTERPRETER_CHECKS[group]), done


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks(sys.argv[-1])))
