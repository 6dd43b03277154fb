"""The fused GroupNorm(+SiLU) and GEGLU ops of ``ldm_sdk.accel.triton_kernels``.

CPU (always):

* the float32 references against the closed-form maths written out here in float64 (group statistics,
  affine, SiLU, erf-GELU), both memory formats, fp32 / bf16 / fp16, with and without a per-(sample,
  channel) ``shift`` (truth: the float64 norm of ``x + shift``); ``shift=None`` is bit-identical to the
  pre-``shift`` formula;
* the references are bit-identical to the eager modules in float32 (``GroupNorm32`` + ``nn.SiLU``,
  ``nn.GroupNorm`` + ``F.silu``, ``GEGLU``): they make the same torch calls in the same order;
* dispatch (``auto`` falls back off CUDA and under autograd), argument errors, the launch plans;
* the Triton kernels themselves through the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before
  Triton is imported, so :func:`test_triton_kernels_in_the_interpreter` runs this file as a script in a
  subprocess (:func:`interpreter_checks`): both memory formats, odd sizes, 3-D input, forced chunking,
  no affine, fp32 / bf16, channels_last group sizes 1..48 (whole groups per column tile and groups
  straddling two tiles), 1x1 maps, against float64, with fresh buffers NaN-filled so an unwritten output
  or statistics partial fails; the same with ``shift`` (both layouts, chunking, straddling groups, shift
  dtypes other than x's), ``shift=None`` / ``shift=zeros`` bit-identical to no shift, and channels_last
  offset means (``|mean| / std`` up to ~700, from x or from the shift) with outliers heading a chunk, held
  to a few float32 ulps of the mean (the pivoted statistics; naive sums of squares fail it) (about 25 s).

GPU (mark ``gpu``, run by ``bench/validate_kernels.py``): the kernels against the float32 reference at the
SD-1.5 UNet shapes (N=2, C 320..2560, 64x64..8x8) and the kl-f8 VAE shapes (C 128..512 up to 512x512), fp16
/ bf16, both memory formats, measured in ulps of the output dtype (:func:`compare_ulps`): every element
within 1 ulp + ``2**-19 * max|ref|`` (two float32 evaluations differ by a few float32 ulps; this only
matters for outputs within ~1e-4 of zero) and at most 1e-4 of the elements more than 1 ulp apart; the
same bound against float64 truth; the same with a ``shift``; fp32 kernels against float64; replay under
a CUDA graph.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.accel.triton_kernels import compare_ulps
from ldm_sdk.models.attention import GEGLU
from ldm_sdk.models.embeddings import GroupNorm32
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

ROOT = Path(__file__).resolve().parents[2]


# -- float64 closed forms ------------------------------------------------------------------------------------
def group_norm_truth(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float, act: str
) -> Tensor:
    """GroupNorm written out in float64: per (sample, group) mean and biased variance over the group's
    channels and positions, ``(x - mean) / sqrt(var + eps) * w + b``, then ``y * sigmoid(y)`` for SiLU."""
    n, c = x.shape[:2]
    xd = x.double().reshape(n, groups, -1)
    mean = xd.sum(-1, keepdim=True) / xd.shape[-1]
    var = ((xd - mean) ** 2).sum(-1, keepdim=True) / xd.shape[-1]
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape(shape)
    if bias is not None:
        y = y + bias.double().reshape(shape)
    if act == "silu":
        y = y / (1 + torch.exp(-y))
    return y


def shifted(x: Tensor, shift: Tensor | None) -> Tensor:
    """``x + shift[:, :, None, ...]`` in float64 (the input the shifted GroupNorm normalises)."""
    if shift is None:
        return x.double()
    return x.double() + shift.double().reshape(*shift.shape, *(1,) * (x.dim() - 2))


def geglu_truth(h: Tensor) -> Tensor:
    """``a * 0.5 g (1 + erf(g / sqrt 2))`` in float64."""
    a, g = h.double().chunk(2, dim=-1)
    return a * 0.5 * g * (1 + torch.erf(g / 2**0.5))


def assert_close_to_truth(out: Tensor, truth: Tensor, what: str, *, max_frac: float = 1e-4) -> None:
    """fp32: within float32 rounding of the float64 result; half precision: one rounding of it (see
    :func:`compare_ulps`; ``max_frac``: the fraction of elements allowed beyond 1 ulp, still in the bound)."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, rtol=2e-6, atol=2e-6 * float(truth.abs().max()))
        return
    report = compare_ulps(out, truth)
    assert report.ok(max_frac), f"{what}: {report}"


# GELU's erf form cancels in float32 for gates below about -4 (1 + erf -> 0; torch's float32 GELU alike):
# there the outputs are ~1e-8 in absolute terms but many ulps of such tiny numbers, so GEGLU is held to
# the absolute part of the bound only (|diff| <= 1 ulp + 2**-19 max|ref| everywhere).
GEGLU_FRAC = 1.0


def make_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    channels_last: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Activations with an offset mean (so the statistics must subtract it) and GroupNorm-like affine."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.5 + 0.7).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(device, dtype)
    b = (0.2 * torch.randn(c, generator=g)).to(device, dtype)
    return x, w, b


def row_strided_shift(shift: Tensor, kind: int) -> Tensor:
    """``shift`` (kind 0), its values as columns ``[3, 3 + C)`` of a wider buffer (kind 1: row stride
    ``C + 5``, offset 3, as one block's slice of a batched projection), or its first row expanded over N
    (kind 2: row stride 0, as a bias without an embedding)."""
    if kind == 0:
        return shift
    if kind == 1:
        wide = torch.full((shift.shape[0], shift.shape[1] + 5), float("nan"), dtype=shift.dtype)
        wide[:, 3 : 3 + shift.shape[1]] = shift
        return wide[:, 3 : 3 + shift.shape[1]]
    return shift[:1].expand_as(shift)


def make_shift(x: Tensor, dtype: torch.dtype | None = None, *, seed: int = 1) -> Tensor:
    """A ``(N, C)`` shift like a conv bias plus a timestep embedding: O(1), with a nonzero mean, so it moves
    the group means and varies within a group (each channel its own value)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(x.shape[:2], generator=g) * 1.2 - 0.4
    return shift.to(x.device, dtype or x.dtype)


# -- references: closed forms, eager equality ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_group_norm_reference_matches_float64(dtype: torch.dtype, channels_last: bool, act: str) -> None:
    x, w, b = make_inputs((3, 12, 5, 7), dtype, channels_last=channels_last)
    out = K.group_norm_act_reference(x, w, b, 4, 1e-5, act)  # type: ignore[arg-type]
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_close_to_truth(out, group_norm_truth(x, w, b, 4, 1e-5, act), f"reference {dtype} {act}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_group_norm_reference_with_shift_matches_float64(
    dtype: torch.dtype, channels_last: bool, act: str, affine: bool
) -> None:
    x, w, b = make_inputs((3, 12, 5, 7), dtype, channels_last=channels_last)
    weight, bias = (w, b) if affine else (None, None)
    shift = make_shift(x)
    out = K.group_norm_act_reference(x, weight, bias, 4, 1e-5, act, shift=shift)  # type: ignore[arg-type]
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    truth = group_norm_truth(shifted(x, shift), weight, bias, 4, 1e-5, act)
    assert_close_to_truth(out, truth, f"reference + shift {dtype} {act} affine={affine}")
    # the shift matters: without it the result is a different one
    assert not torch.equal(out, K.group_norm_act_reference(x, weight, bias, 4, 1e-5, act))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("x_dtype", "shift_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float64),
     (torch.float64, torch.float32)],
    ids=str,
)  # fmt: skip
def test_group_norm_reference_shift_of_another_dtype(x_dtype: torch.dtype, shift_dtype: torch.dtype) -> None:
    """Any floating shift; it is used in x's compute dtype (float32, float64 for float64 x), and the sum is
    formed there: not rounded to ``x.dtype`` first."""
    x, w, b = make_inputs((2, 8, 33), x_dtype)  # 3-D (AttentionBlock-like)
    shift = make_shift(x, shift_dtype)
    out = K.group_norm_act_reference(x, w, b, 2, 1e-6, "silu", shift=shift)
    assert out.dtype == x_dtype
    truth = group_norm_truth(shifted(x, shift.to(K._compute_dtype(x_dtype))), w, b, 2, 1e-6, "silu")
    if x_dtype == torch.float64:
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    else:
        assert_close_to_truth(out, truth, f"{x_dtype} x, {shift_dtype} shift")
    ct = K._compute_dtype(x_dtype)
    unrounded = F.silu(F.group_norm(x.to(ct) + shift.to(ct)[..., None], 2, w.to(ct), b.to(ct), 1e-6))
    assert torch.equal(out, unrounded.to(x_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_reference_without_shift_is_unchanged(dtype: torch.dtype, channels_last: bool) -> None:
    """``shift=None`` (or no ``shift``) is bit for bit the formula the reference had before ``shift``."""
    x, w, b = make_inputs((2, 12, 5, 7), dtype, channels_last=channels_last)
    ct = K._compute_dtype(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for act in ("none", "silu"):
        before = F.group_norm(x.to(ct), 4, w.to(ct), b.to(ct), 1e-5)
        before = (F.silu(before) if act == "silu" else before).to(dtype).contiguous(memory_format=fmt)
        for out in (
            K.group_norm_act_reference(x, w, b, 4, 1e-5, act),  # type: ignore[arg-type]
            K.group_norm_act_reference(x, w, b, 4, 1e-5, act, shift=None),  # type: ignore[arg-type]
            K.group_norm_act(x, w, b, 4, 1e-5, act, shift=None),  # type: ignore[arg-type]
        ):
            assert torch.equal(out, before) and out.stride() == before.stride()


def test_group_norm_reference_without_affine_and_3d() -> None:
    x = torch.randn(2, 8, 33) * 2 - 1
    out = K.group_norm_act_reference(x, None, None, 2, 1e-6, "silu")
    assert_close_to_truth(out, group_norm_truth(x, None, None, 2, 1e-6, "silu"), "3-D, no affine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_geglu_reference_matches_float64(dtype: torch.dtype) -> None:
    h = (torch.randn(3, 5, 2 * 37) * 2).to(dtype)
    out = K.geglu_reference(h)
    assert out.shape == (3, 5, 37) and out.dtype == dtype
    assert_close_to_truth(out, geglu_truth(h), f"geglu reference {dtype}", max_frac=GEGLU_FRAC)


def test_references_are_bit_identical_to_eager_float32() -> None:
    """Why fused models equal unfused ones bit for bit on the CPU in float32: same calls, same order."""
    x = torch.randn(2, 64, 6, 6)
    norm32 = GroupNorm32(32, 64)
    plain = nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        for norm in (norm32, plain):
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
        eager32 = nn.SiLU()(norm32(x))
        fused32 = K.group_norm_act_reference(x, norm32.weight, norm32.bias, 32, norm32.eps, "silu")
        assert torch.equal(fused32, eager32)
        assert torch.equal(
            K.group_norm_act_reference(x, plain.weight, plain.bias, 32, 1e-6, "silu"), F.silu(plain(x))
        )
        assert torch.equal(
            K.group_norm_act_reference(x, plain.weight, plain.bias, 32, 1e-6, "none"), plain(x)
        )
        geglu = GEGLU(16, 24)
        tokens = torch.randn(2, 9, 16)
        assert torch.equal(K.geglu_reference(geglu.proj(tokens)), geglu(tokens))


# -- dispatch and errors -------------------------------------------------------------------------------------
def test_auto_backend_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("the Triton path must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(K, "group_norm_act_triton", refuse)
    monkeypatch.setattr(K, "geglu_triton", refuse)
    x, w, b = make_inputs((2, 8, 4, 4), torch.float32)
    assert torch.equal(
        K.group_norm_act(x, w, b, 4, 1e-5, "silu"), K.group_norm_act_reference(x, w, b, 4, 1e-5, "silu")
    )
    h = torch.randn(4, 10)
    assert torch.equal(K.geglu(h), K.geglu_reference(h))


def test_autograd_falls_back_or_is_refused() -> None:
    x, w, b = make_inputs((2, 8, 4, 4), torch.float32)
    w.requires_grad_(True)
    K.group_norm_act(x, w, b, 4, 1e-5, "silu").sum().backward()  # auto: the differentiable reference
    assert w.grad is not None and torch.isfinite(w.grad).all()
    if K.triton_available():
        with pytest.raises(RuntimeError, match="no backward"):
            K.group_norm_act(x, w, b, 4, 1e-5, "silu", backend="triton")


def test_autograd_through_shift_falls_back_or_is_refused() -> None:
    """``shift`` counts for the autograd check: a shift that needs a gradient takes the reference."""
    x, w, b = make_inputs((2, 8, 4, 4), torch.float32)
    shift = make_shift(x).requires_grad_(True)
    K.group_norm_act(x, w, b, 4, 1e-5, "silu", shift=shift).sum().backward()
    assert shift.grad is not None and shift.grad.shape == (2, 8) and torch.isfinite(shift.grad).all()
    if K.triton_available():
        with pytest.raises(RuntimeError, match="no backward"):
            K.group_norm_act(x, w, b, 4, 1e-5, "silu", shift=shift, backend="triton")


@pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this session runs the Triton interpreter")
    x, w, b = make_inputs((2, 8, 4, 4), torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.group_norm_act(x, w, b, 4, 1e-5, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        K.group_norm_act_triton(x.double(), None, None, 4, 1e-5)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda x: K.group_norm_act_reference(x, None, None, 5, 1e-5), "not divisible by num_groups=5"),
        (lambda x: K.group_norm_act_reference(x, None, None, 0, 1e-5), "num_groups must be an int >= 1"),
        (lambda x: K.group_norm_act_reference(x, torch.ones(3), None, 4, 1e-5), "weight must be None or"),
        (lambda x: K.group_norm_act_reference(x, None, None, 4, -1.0), "eps must be a float >= 0"),
        (lambda x: K.group_norm_act_reference(x, None, None, 4, 1e-5, "gelu"), "valid: none, silu"),  # type: ignore[arg-type]
        (lambda x: K.group_norm_act_reference(x.long(), None, None, 4, 1e-5), "floating-point"),
        (
            lambda x: K.group_norm_act(x, None, None, 4, 1e-5, backend="cuda"),
            "valid: auto, triton, reference",
        ),  # type: ignore[arg-type]
        (lambda x: K.geglu_reference(torch.randn(3, 5)), "even last"),
    ],
)
def test_argument_errors_say_what_is_valid(call: Callable[[Tensor], object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        call(torch.randn(2, 8, 4, 4))


@pytest.mark.parametrize(
    ("shift", "words"),
    [
        (torch.zeros(2, 9), r"shape \(N, C\) = \(2, 8\).*got shape \(2, 9\)"),
        (torch.zeros(8), r"shape \(N, C\) = \(2, 8\).*got shape \(8,\)"),
        (torch.zeros(2, 8, 1, 1), r"shape \(N, C\) = \(2, 8\).*got shape \(2, 8, 1, 1\)"),
        (torch.zeros(2, 8, dtype=torch.long), "floating-point tensor .*got torch.int64"),
        (torch.zeros(2, 8, dtype=torch.bool), "floating-point tensor .*got torch.bool"),
        (torch.zeros(2, 8, device="meta"), "shift is on meta but x is on cpu: shift must be on x's device"),
        ([[0.0] * 8] * 2, "shift must be None or a floating-point tensor of shape .*got a list"),
    ],
    ids=["channels", "1-d", "4-d", "long", "bool", "device", "list"],
)
@pytest.mark.parametrize("entry", ["reference", "dispatch", "triton"])
def test_shift_errors_say_what_is_valid(shift: object, words: str, entry: str) -> None:
    x = torch.randn(2, 8, 4, 4)
    if entry == "triton" and not K.triton_available():
        pytest.skip("triton is not installed")
    call = {
        "reference": K.group_norm_act_reference,
        "dispatch": K.group_norm_act,
        "triton": K.group_norm_act_triton,
    }[entry]
    with torch.no_grad(), pytest.raises(ValueError, match=words):
        call(x, None, None, 4, 1e-5, shift=shift)  # type: ignore[operator]


# -- launch plans --------------------------------------------------------------------------------------------
def _covers(units: int, chunking: K.Chunking) -> None:
    assert chunking.chunk % chunking.tile == 0
    assert chunking.split * chunking.chunk >= units > (chunking.split - 1) * chunking.chunk


@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 1280, 8, 8), (2, 2560, 8, 8), (1, 128, 512, 512), (1, 512, 64, 64), (3, 12, 5, 7),
     (2, 64, 4, 4), (2, 8, 33)],
)  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True])
def test_plans_cover_the_groups_and_fill_the_gpu(shape: tuple[int, ...], channels_last: bool) -> None:
    groups = 4 if shape[1] % 32 else 32
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    plan = K.plan_group_norm(shape, groups, channels_last=channels_last, target_programs=4 * 132)
    cg = shape[1] // groups
    programs = shape[0] * groups * plan.stats.split
    if channels_last:
        assert plan.block_c >= cg and plan.block_c & (plan.block_c - 1) == 0
        assert plan.parts == (1 if plan.block_c % cg == 0 else 2)
        _covers(plan.s, plan.stats)
        programs = shape[0] * -(-shape[1] // plan.block_c) * plan.stats.split
    else:
        assert plan.block & (plan.block - 1) == 0 and plan.apply_block & (plan.apply_block - 1) == 0
        _covers(cg * plan.s, plan.stats)
        _covers(plan.s, plan.apply)
    assert plan.stats.chunk * (1 if not channels_last else cg) <= K.MAX_CHUNK
    if channels_last:  # as many programs as the target, or about one per tile when there are fewer tiles
        tiles = programs // plan.stats.split * -(-plan.s // plan.stats.tile)
        assert programs >= min(4 * 132, tiles) // 2
    elif plan.group_size >= 4 * plan.stats.tile:  # enough work: more programs than there are groups
        assert programs >= min(4 * 132, shape[0] * groups * 4)


@pytest.mark.parametrize(
    "channels", [12, 32, 40, 64, 80, 96, 128, 160, 320, 640, 960, 1280, 1920, 2560, 4096]
)
@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16, 32])
def test_channels_last_tiles_touch_at_most_block_g_groups(channels: int, groups: int) -> None:
    """Every column tile of a channels_last plan touches at most ``block_g`` groups, and a group spans at
    most ``parts`` tiles (the kernels' one-hot maps and partial slots rely on both)."""
    if channels % groups:
        pytest.skip("C not divisible by G")
    plan = K.plan_group_norm((2, channels, 8, 8), groups, channels_last=True, target_programs=4 * 132)
    cg, bc = channels // groups, plan.block_c
    for t in range(-(-channels // bc)):
        touched = {c // cg for c in range(t * bc, min((t + 1) * bc, channels))}
        assert len(touched) <= plan.block_g and min(touched) == t * bc // cg
    for g in range(groups):
        assert (g * cg + cg - 1) // bc - g * cg // bc < plan.parts
    assert plan.block_g & (plan.block_g - 1) == 0 and plan.parts * plan.stats.split <= K.MAX_SPLIT


def test_channels_last_tiling_follows_the_batch() -> None:
    """Pipelined row loops from batch ``NHWC_PIPELINE_MIN_BATCH`` (measured faster at batch 16), plain
    ones below (measured faster at batch 1-2), 32 x 64 tiles either way; a tiling can be forced."""
    for batch, tiles in ((1, K.NHWC_PLAIN), (2, K.NHWC_PLAIN), (8, K.NHWC_PIPELINED), (16, K.NHWC_PIPELINED)):
        plan = K.plan_group_norm((batch, 320, 64, 64), 32, channels_last=True, target_programs=4 * 132)
        assert plan.block_c == tiles.cols and plan.block_s * plan.block_c == tiles.max_block, batch
        assert plan.stages == tiles.stages, batch
        assert plan.num_warps == (tiles.stats_warps or K._warps(tiles.max_block)), batch
        assert plan.apply_warps == (tiles.apply_warps or K._warps(tiles.max_block)), batch
    # 32 elements per thread in both kernels below batch 8 (measured faster at batch 1 and 2)
    assert K.NHWC_PLAIN.max_block // (32 * K.NHWC_PLAIN.stats_warps) == 32
    assert K.NHWC_PLAIN.max_block // (32 * K.NHWC_PLAIN.apply_warps) == 32
    wide = K.NhwcTiles(max_block=4096, cols=64, stages=3)
    forced = K.plan_group_norm((2, 320, 64, 64), 32, channels_last=True, target_programs=4 * 132, nhwc=wide)
    assert forced.block_c == 64 and forced.block_s == 64 and forced.num_warps == 8 and forced.stages == 3
    assert forced.apply_warps == 8


@pytest.mark.parametrize(
    ("channels", "groups", "cols32", "cols64"),
    [(320, 32, 32, 64), (640, 32, 32, 64), (1280, 32, 64, 64), (1920, 32, 64, 64), (2560, 32, 128, 128),
     (128, 32, 32, 64), (512, 32, 32, 64), (96, 32, 32, 32), (40, 4, 32, 32), (12, 4, 16, 16),
     (80, 2, 64, 64), (4096, 1, 4096, 4096)],
)  # fmt: skip
def test_channels_last_column_tiles(channels: int, groups: int, cols32: int, cols64: int) -> None:
    """The column tile: the tiling's width (wider for wider groups; narrowed towards 32 or the group where
    it would pad C by more than 1/8); the rows fill the tiling's elements; the contiguous plan keeps
    2048."""
    cg = channels // groups
    assert K._nhwc_block_c(channels, cg, 32) == cols32
    assert K._nhwc_block_c(channels, cg, 64) == cols64
    for tiles in (K.NHWC_PLAIN, K.NHWC_PIPELINED):
        shape = (16 if tiles is K.NHWC_PIPELINED else 2, channels, 64, 64)
        plan = K.plan_group_norm(shape, groups, channels_last=True, target_programs=4 * 132)
        assert plan.block_c == cols32
        assert plan.block_s * plan.block_c == max(tiles.max_block, cols32)
    assert K.plan_group_norm(shape, groups, channels_last=False, target_programs=4 * 132).block <= K.MAX_BLOCK
    small = K.plan_group_norm(shape, groups, channels_last=True, target_programs=4 * 132, max_block=1024)
    assert small.block_s * small.block_c == max(1024, small.block_c)


def test_sd15_batch2_statistics_use_more_than_64_programs() -> None:
    """Batch 2 x 32 groups is 64 groups; the split reduction must spread them over the 132 SMs."""
    plan = K.plan_group_norm((2, 320, 64, 64), 32, channels_last=False, target_programs=4 * 132)
    assert 2 * 32 * plan.stats.split >= 2 * 132  # whole tiles per chunk: about, not exactly, the target
    plan = K.plan_group_norm((2, 320, 64, 64), 32, channels_last=True, target_programs=4 * 132)
    assert 2 * (320 // plan.block_c) * plan.stats.split >= 2 * 132  # (sample, column tile, chunk) programs
    plan = K.plan_group_norm((1, 128, 512, 512), 32, channels_last=True, target_programs=4 * 132)
    assert (128 // plan.block_c) * plan.stats.split >= 2 * 132


def test_plan_rejects_a_bad_block() -> None:
    with pytest.raises(ValueError, match="power of two"):
        K.plan_group_norm((2, 8, 4, 4), 4, channels_last=False, target_programs=4, max_block=24)


def test_ulp_measure() -> None:
    ref = torch.tensor([1.0, 1.0, -2.0, 0.0, 1e-3], dtype=torch.float64)
    out = torch.tensor([1.0, 1.0 + 2**-10, -2.0, 0.0, 1e-3], dtype=torch.float16)
    report = compare_ulps(out, ref, noise=0.0)
    assert report.max_ulps == pytest.approx(1.0, rel=1e-3) and report.within_bound
    assert K.output_ulp(torch.tensor([1.0, 3.0, 0.0]), torch.bfloat16).tolist() == [2**-7, 2**-6, 2**-133]


# -- the kernels in the Triton interpreter (CPU) -------------------------------------------------------------
def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    cases = [
        # shape, groups, dtype, channels_last, act, affine, max_block, target_programs
        ((2, 12, 5, 7), 4, torch.float32, False, "silu", True, 16, 32),  # split chunks, several tiles each
        ((2, 12, 5, 7), 4, torch.bfloat16, True, "none", True, 16, 32),
        ((3, 12, 5, 7), 4, torch.float32, True, "silu", True, None, None),  # default tiles
        ((1, 64, 4, 4), 32, torch.bfloat16, False, "silu", True, 2048, None),  # 4x4 maps, 2 channels / group
        ((1, 64, 4, 4), 32, torch.bfloat16, True, "silu", True, None, None),
        ((2, 8, 33), 2, torch.float32, False, "none", False, 16, 16),  # 3-D (AttentionBlock), no affine
        # channels_last: C / G = 1, 4, 10, 16, 20, 40 (tiles of whole groups, and groups split across two
        # column tiles), odd / 4x4 / 1x1 maps, N 1 and 2, chunks split over programs (small max_block)
        ((2, 32, 5, 7), 32, torch.float32, True, "none", False, 16, 64),  # C/G 1, 1-row tiles, split
        ((1, 64, 4, 4), 16, torch.bfloat16, True, "silu", True, 64, 8),  # C/G 4, whole groups per tile
        ((2, 40, 5, 7), 4, torch.float32, True, "silu", True, 64, 64),  # C/G 10, groups straddle tiles
        ((1, 64, 1, 1), 4, torch.bfloat16, True, "silu", False, None, None),  # C/G 16, 1x1
        ((2, 160, 4, 4), 8, torch.bfloat16, True, "none", True, 128, 64),  # C/G 20, 5 tiles, split
        ((2, 80, 5, 7), 2, torch.float32, True, "silu", True, 128, 64),  # C/G 40: 64-column tiles
        ((1, 96, 5, 7), 2, torch.bfloat16, True, "none", False, None, None),  # C/G 48, partial last tile
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for shape, groups, dtype, channels_last, act, affine, max_block, target in cases:
            x, w, b = make_inputs(shape, dtype, channels_last=channels_last)
            weight, bias = (w, b) if affine else (None, None)
            # the statistics + apply kernels, and (all these groups fit) the single-pass kernel
            for single in (False, True):
                out = K.group_norm_act_triton(
                    x, weight, bias, groups, 1e-5, act, max_block=max_block, target_programs=target,
                    single_pass=single,
                )  # fmt: skip
                assert out.stride() == x.stride(), f"memory format not kept: {out.stride()} vs {x.stride()}"
                what = (
                    f"group_norm_act{shape} G={groups} {dtype} cl={channels_last} {act} affine={affine} "
                    f"single_pass={single}"
                )
                assert_close_to_truth(out, group_norm_truth(x, weight, bias, groups, 1e-5, act), what)
                done.append(what)
        # shift: x + shift[n, c] formed in float32 in both passes; both layouts, chunked group runs whose
        # tiles cross channel boundaries (contiguous: the shift is gathered per element), groups straddling
        # channels_last column tiles, partial last tiles, 3-D input, shift dtypes other than x's
        shift_cases = [
            # shape, groups, dtype, shift dtype, channels_last, act, affine, max_block, target_programs
            ((2, 12, 5, 7), 4, torch.float32, torch.float32, False, "silu", True, 16, 32),
            ((2, 12, 5, 7), 4, torch.bfloat16, torch.bfloat16, False, "none", False, 16, 32),
            ((2, 8, 33), 2, torch.bfloat16, torch.float32, False, "silu", True, 16, 16),  # 3-D
            ((3, 12, 5, 7), 4, torch.bfloat16, torch.bfloat16, True, "silu", True, 16, 32),  # C/G 3, 1 tile
            ((2, 40, 5, 7), 4, torch.float32, torch.bfloat16, True, "silu", True, 64, 64),  # C/G 10, straddle
            ((2, 160, 4, 4), 8, torch.bfloat16, torch.bfloat16, True, "none", True, 128, 64),  # C/G 20, split
            ((1, 96, 5, 7), 2, torch.bfloat16, torch.float16, True, "silu", False, 2048, None),  # C/G 48
            ((2, 32, 5, 7), 32, torch.float32, torch.float32, True, "none", False, 16, 64),  # C/G 1
        ]
        for i, (
            shape,
            groups,
            dtype,
            shift_dtype,
            channels_last,
            act,
            affine,
            max_block,
            target,
        ) in enumerate(shift_cases):
            x, w, b = make_inputs(shape, dtype, channels_last=channels_last)
            weight, bias = (w, b) if affine else (None, None)
            # read in place: contiguous, a column slice of a wider (N, C') tensor, or one row expanded
            shift = row_strided_shift(make_shift(x, shift_dtype), i % 3)
            truth = group_norm_truth(shifted(x, shift.float()), weight, bias, groups, 1e-5, act)
            for single in (False, True):
                out = K.group_norm_act_triton(
                    x, weight, bias, groups, 1e-5, act, shift=shift, max_block=max_block,
                    target_programs=target, single_pass=single,
                )  # fmt: skip
                assert out.stride() == x.stride(), f"memory format not kept: {out.stride()} vs {x.stride()}"
                what = (
                    f"group_norm_act{shape} G={groups} {dtype} + {shift_dtype} shift cl={channels_last} "
                    f"{act} affine={affine} single_pass={single}"
                )
                assert_close_to_truth(out, truth, what)
                done.append(what)
        # offset means, |mean| >> std (a channel offset of x, or a shift carrying it), and outliers: the
        # channels_last statistics sum deviations from a per-column pivot, so the centred values keep their
        # float32 precision; a plain float32 sum / sum of squares loses about (mean / std)^2 ulps of the
        # variance (torch's CPU float32 group_norm is off by ~0.5 at the first case). Chunked, the last
        # chunk and its last tile partial (the apply pass walks them last to first), groups straddling
        # column tiles, an outlier heading the first tile of a chunk (the pivot's worst case).
        offset_cases = [
            # shape, groups, dtype, x offset, shift offset (None: no shift), outlier, max_block, target
            ((1, 64, 13, 11), 4, torch.float32, 1000.0, None, False, 256, 16),  # C/G 16, 11-row last chunk
            ((2, 96, 9, 9), 4, torch.float32, 0.0, 1000.0, True, 512, 16),  # C/G 24 straddles, shift
            # half precision: x not so coarsely quantised that one value, repeated, decides the check
            ((2, 40, 11, 7), 4, torch.float16, 0.0, 60.0, True, 64, 64),  # C/G 10 straddles
            ((2, 64, 13, 11), 2, torch.float16, -45.0, None, True, None, 8),  # default tiles, 2 chunks
        ]
        for shape, groups, dtype, x_off, shift_off, outlier, max_block, target in offset_cases:
            plan = K.plan_group_norm(
                shape, groups, channels_last=True, target_programs=target, max_block=max_block
            )
            assert plan.stats.split > 1 and plan.s % plan.stats.chunk and plan.s % plan.block_s, plan
            x, w, b = make_inputs(shape, dtype, channels_last=True)
            x = (x.float() + x_off).to(dtype)
            if outlier:  # channel 5, first row of the second chunk
                h, col = divmod(plan.stats.chunk, shape[3])
                x[:, 5, h, col] = x_off + (2000.0 if dtype != torch.float16 else 200.0)
            shift = None
            if shift_off is not None:
                shift = shift_off + 0.3 * make_shift(x, torch.float32)
                shift = shift.to(torch.bfloat16 if dtype == torch.float16 else dtype)
            xs = shifted(x, shift).reshape(shape[0], groups, -1)
            offset = float((xs.mean(-1).abs() / xs.std(-1)).max())
            assert offset > 25, offset
            truth = group_norm_truth(shifted(x, shift), w, b, groups, 1e-5, "silu")
            out = K.group_norm_act_triton(
                x, w, b, groups, 1e-5, "silu", shift=shift, max_block=max_block, target_programs=target,
                single_pass=False,
            )  # fmt: skip
            what = f"group_norm_act{shape} {dtype} |mean| / std {offset:.0f} outlier={outlier}"
            # float32 holds the mean to ~2**-24 |mean|, i.e. 2**-24 |mean| / std of the normalised values,
            # whatever the algorithm: allow a few of those (plus the output's rounding), everywhere. Naive
            # float32 sums of squares miss by ~2**-24 (|mean| / std)^2 of the variance, far more.
            bound = 8 * 2**-24 * offset * float(w.abs().max()) + 2e-6 * float(truth.abs().max())
            err = (out.double() - truth).abs()
            if dtype != torch.float32:
                err = err - K.output_ulp(truth, dtype)
            assert float(err.max()) <= bound, (
                f"{what}: max |diff| - 1 ulp {float(err.max()):.3e} > {bound:.3e}"
            )
            done.append(what)
        # no shift: shift=None and a zero shift (x + 0.0 is exact) are bit for bit the unshifted kernels
        for shape, dtype, channels_last, max_block in (
            ((2, 12, 5, 7), torch.bfloat16, False, 16),
            ((2, 40, 5, 7), torch.float32, True, 64),
        ):
            x, w, b = make_inputs(shape, dtype, channels_last=channels_last)
            kwargs = {"max_block": max_block, "target_programs": 32, "single_pass": False}
            plain = K.group_norm_act_triton(x, w, b, 4, 1e-5, "silu", **kwargs)  # type: ignore[arg-type]
            for shift in (None, torch.zeros(shape[:2], dtype=dtype)):
                out = K.group_norm_act_triton(x, w, b, 4, 1e-5, "silu", shift=shift, **kwargs)  # type: ignore[arg-type]
                assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   plain.view(torch.int16 if dtype != torch.float32 else torch.int32)), (
                    f"shift={'None' if shift is None else 'zeros'} changed the unshifted result {shape}"
                )  # fmt: skip
            done.append(f"group_norm_act{shape} {dtype} cl={channels_last}: shift None / zeros == no shift")
        x, w, b = make_inputs((2, 12, 6, 5), torch.float32)
        strided = x.transpose(2, 3)  # neither contiguous nor channels_last: copied first
        out = K.group_norm_act_triton(strided, w, b, 4, 1e-6, "silu")
        assert_close_to_truth(out, group_norm_truth(strided, w, b, 4, 1e-6, "silu"), "strided input")
        done.append("group_norm_act strided input")
        for shape, dtype in (((5, 3, 2 * 37), torch.float32), ((4, 2 * 130), torch.bfloat16)):
            h = (torch.randn(shape) * 2).to(dtype)
            out = K.geglu_triton(h)
            assert out.shape == (*shape[:-1], shape[-1] // 2)
            assert_close_to_truth(out, geglu_truth(h), f"geglu {shape} {dtype}", max_frac=GEGLU_FRAC)
            done.append(f"geglu{shape} {dtype}")
        assert K.group_norm_act_triton(torch.empty(0, 8, 3, 3), None, None, 4, 1e-5).shape == (0, 8, 3, 3)
        # a group above SINGLE_PASS_MAX: "auto" takes the two kernels, forcing the single pass is refused
        x, w, b = make_inputs((1, 4, 130, 127), torch.bfloat16, channels_last=True)
        out = K.group_norm_act_triton(x, w, b, 2, 1e-5, "silu")
        assert_close_to_truth(out, group_norm_truth(x, w, b, 2, 1e-5, "silu"), "group above the single pass")
        try:
            K.group_norm_act_triton(x, w, b, 2, 1e-5, "silu", single_pass=True)
        except ValueError as exc:
            assert "single_pass needs a group tile of at most" in str(exc), exc
        else:
            raise AssertionError("single_pass=True took a group above SINGLE_PASS_MAX")
        done.append("group_norm_act above SINGLE_PASS_MAX: two kernels; single_pass=True refused")
        # the fusion pass's modules, forced onto the kernels
        from ldm_sdk.accel.fusion import FusedGEGLU, FusedGroupNorm

        norm = GroupNorm32(4, 12)
        nn.init.normal_(norm.weight, 1, 0.2)
        nn.init.normal_(norm.bias, 0, 0.2)
        x = torch.randn(2, 12, 5, 7).to(torch.bfloat16)
        fused = FusedGroupNorm.from_norm(norm.to(torch.bfloat16), act="silu", backend="triton")
        assert_close_to_truth(
            fused(x), group_norm_truth(x, norm.weight, norm.bias, 4, norm.eps, "silu"), "module"
        )
        done.append("FusedGroupNorm(backend='triton')")
        plain = GEGLU(6, 10)
        tokens = torch.randn(3, 4, 6)
        out = FusedGEGLU.from_geglu(plain, backend="triton")(tokens)
        assert_close_to_truth(out, geglu_truth(plain.proj(tokens)), "FusedGEGLU")
        done.append("FusedGEGLU(backend='triton')")
    return done


@pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
def test_triton_kernels_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 2 * 13 + 5 + 2 * 8 + 4 + 2 + 1, done


# -- GPU -----------------------------------------------------------------------------------------------------
SD15_SHAPES = [(2, 320, 64, 64), (2, 640, 64, 64), (2, 640, 32, 32), (2, 960, 32, 32), (2, 1280, 16, 16),
               (2, 1920, 16, 16), (2, 1280, 8, 8), (2, 2560, 8, 8)]  # fmt: skip
VAE_SHAPES = [(1, 128, 512, 512), (1, 256, 256, 256), (1, 512, 128, 128), (1, 512, 64, 64)]
HALF = [torch.float16, torch.bfloat16]


def _gpu_case(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, act: str, eps: float
) -> list[str]:
    x, w, b = make_inputs(shape, dtype, channels_last=channels_last, device="cuda", seed=shape[1])
    out = K.group_norm_act_triton(x, w, b, 32, eps, act)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    assert out.stride() == x.stride() and out.dtype == dtype
    failures = []
    for name, ref in (
        ("float32 reference", K.group_norm_act_reference(x, w, b, 32, eps, act)),  # type: ignore[arg-type]
        ("float64 truth", group_norm_truth(x, w, b, 32, eps, act)),
    ):
        report = compare_ulps(out, ref)
        if not report.ok():
            failures.append(f"{shape} {dtype} cl={channels_last} {act} vs {name}: {report}")
    return failures


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_kernel_ulps_sd15_shapes(dtype: torch.dtype, channels_last: bool) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    failures = [
        f
        for s in SD15_SHAPES
        for act in ("silu", "none")
        for f in _gpu_case(s, dtype, channels_last, act, 1e-5)
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_kernel_ulps_vae_shapes(dtype: torch.dtype, channels_last: bool) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    failures = [
        f
        for s in VAE_SHAPES
        for act in ("silu", "none")
        for f in _gpu_case(s, dtype, channels_last, act, 1e-6)
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_kernel_ulps_with_shift_sd15_shapes(dtype: torch.dtype, channels_last: bool) -> None:
    """A ResBlock's norm with its conv bias + timestep embedding folded in as ``shift`` (model dtype)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    failures = []
    for shape in SD15_SHAPES:
        x, w, b = make_inputs(shape, dtype, channels_last=channels_last, device="cuda", seed=shape[1])
        shift = make_shift(x, seed=shape[1] + 1)
        out = K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu", shift=shift)
        torch.cuda.synchronize()
        assert out.stride() == x.stride() and out.dtype == dtype
        for name, ref in (
            ("float32 reference", K.group_norm_act_reference(x, w, b, 32, 1e-5, "silu", shift=shift)),
            ("float64 truth", group_norm_truth(shifted(x, shift), w, b, 32, 1e-5, "silu")),
        ):
            report = compare_ulps(out, ref)
            if not report.ok():
                failures.append(f"{shape} {dtype} cl={channels_last} + shift vs {name}: {report}")
        assert torch.equal(K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu", shift=None),
                           K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu"))  # fmt: skip
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_kernel_float32_and_odd_shapes(channels_last: bool) -> None:
    for shape, groups in (
        ((2, 320, 64, 64), 32),
        ((3, 12, 5, 7), 4),
        ((1, 64, 4, 4), 32),
        ((5, 96, 33, 17), 32),
    ):
        x, w, b = make_inputs(shape, torch.float32, channels_last=channels_last, device="cuda")
        for act in ("none", "silu"):
            out = K.group_norm_act_triton(x, w, b, groups, 1e-5, act)
            assert_close_to_truth(out, group_norm_truth(x, w, b, groups, 1e-5, act), f"fp32 {shape} {act}")
        for dtype in HALF:
            xh, wh, bh = x.to(dtype), w.to(dtype), b.to(dtype)
            report = compare_ulps(
                K.group_norm_act_triton(xh, wh, bh, groups, 1e-5, "silu"),
                group_norm_truth(xh, wh, bh, groups, 1e-5, "silu"),
            )
            assert report.ok(), f"{shape} {dtype}: {report}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*HALF, torch.float32], ids=str)
def test_geglu_kernel(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240), (2, 64, 10240), (3, 7, 74)):
        h = (torch.randn(shape, generator=g, device="cuda") * 2).to(dtype)
        out = K.geglu_triton(h)
        if dtype == torch.float32:
            assert_close_to_truth(out, geglu_truth(h), f"geglu {shape}")
            continue
        for name, ref in (("float32 reference", K.geglu_reference(h)), ("float64 truth", geglu_truth(h))):
            report = compare_ulps(out, ref)
            assert report.ok(GEGLU_FRAC), f"geglu {shape} {dtype} vs {name}: {report}"


@pytest.mark.gpu
def test_kernels_replay_in_a_cuda_graph() -> None:
    x, w, b = make_inputs((2, 640, 32, 32), torch.float16, device="cuda")
    h = torch.randn(2, 1024, 5120, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = (K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu"), K.geglu_triton(h))  # compiles
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu")
            K.geglu_triton(h)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = (K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu"), K.geglu_triton(h))
        x.mul_(-1)
        h.mul_(0.5)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static[0], K.group_norm_act_triton(x, w, b, 32, 1e-5, "silu"))
        assert torch.equal(static[1], K.geglu_triton(h))
        assert not torch.equal(static[0], eager[0])


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
