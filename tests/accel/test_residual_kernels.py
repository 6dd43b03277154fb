"""The fused residual add + LayerNorm and bias + residual add of ``ldm_sdk.accel.residual_kernels``.

CPU (always):

* the float32 references against the closed forms written out here in float64 (the sum, the LayerNorm of the
  rounded sum, the bias broadcast over dim 1), fp32 / bf16 / fp16, both memory formats;
* the references are bit-identical to eager float32 (``s = y + r; F.layer_norm(s)``, ``nn.LayerNorm``,
  ``residual + (y + bias.view(1, C, 1, 1))``): the same torch calls in the same order;
* dispatch (``auto`` falls back off CUDA, under autograd and above the kernels' size limits), argument errors;
* the Triton kernels themselves through the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before
  Triton is imported, so :func:`test_residual_kernels_in_the_interpreter` runs this file as a script in a
  subprocess (:func:`interpreter_checks`), with fresh buffers NaN-filled so an unwritten output fails.
  ``add_layer_norm``: ``s`` equal to the float64 sum rounded once, ``n`` within one output ulp (+ float32
  noise, :func:`compare_ulps`) of the float64 LayerNorm of the kernel's own ``s``; (2, 77, 320), odd rows,
  C = 1280, C = 100 and 40, partial row blocks, no affine, strided input, fp32 / bf16 / fp16.
  ``bias_residual_add``: equal to the float32 reference bit for bit and within the ulp bound of float64;
  NCHW and channels_last 4-D, 3-D, a residual in the other layout, no bias, no residual, odd sizes, blocks
  in one channel and blocks spanning channels.

GPU (mark ``gpu``): the kernels against the float32 reference at SD-1.5 shapes, fp16 / bf16, and replay
under a CUDA graph.
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

from ldm_sdk.accel import residual_kernels as R
from ldm_sdk.accel.triton_kernels import compare_ulps, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

ROOT = Path(__file__).resolve().parents[2]
HALF = [torch.float16, torch.bfloat16]


# -- float64 closed forms ------------------------------------------------------------------------------------
def sum_truth(y: Tensor, residual: Tensor) -> Tensor:
    """``y + residual`` in float64 (exact for fp16; for bf16 / fp32 within float64 rounding)."""
    return y.double() + residual.double()


def layer_norm_truth(s: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim in float64: ``(s - mean) / sqrt(var + eps) * w + b``, biased variance."""
    x = s.double()
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    out = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out


def bias_residual_truth(y: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    out = y.double()
    if bias is not None:
        out = out + bias.double().view(1, -1, *([1] * (y.dim() - 2)))
    if residual is not None:
        out = out + residual.double()
    return out


def assert_within_ulps(out: Tensor, truth: Tensor, what: str) -> None:
    """Every element within one ulp of ``out``'s dtype + float32 noise of ``truth`` (:func:`compare_ulps`);
    for fp16 / bf16 also at most 1e-4 of the elements beyond one ulp (float32 outputs are a few float32
    ulps off float64, which the noise allowance covers)."""
    report = compare_ulps(out, truth)
    assert report.within_bound, f"{what}: {report}"
    if out.dtype != torch.float32:
        assert report.ok(), f"{what}: {report}"


def assert_rounded_once(s: Tensor, truth: Tensor, what: str) -> None:
    """``s`` is ``truth`` rounded once to ``s.dtype``: within half an ulp, and equal to torch's rounding."""
    report = compare_ulps(s, truth, noise=0.0)
    assert report.max_ulps <= 0.5, f"{what}: {report}"
    assert torch.equal(s, truth.to(s.dtype)), f"{what}: not the once-rounded sum"


def make_ln_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, *, device: str = "cpu", seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block output ``y``, residual stream ``r`` with an offset mean, LayerNorm-like affine."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g).to(device, dtype)
    r = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    c = shape[-1]
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(device, dtype)
    b = (0.2 * torch.randn(c, generator=g)).to(device, dtype)
    return y, r, w, b


def make_conv_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    channels_last: bool = False,
    residual_channels_last: bool | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Conv output ``y``, per-channel bias, skip ``residual`` (in ``residual_channels_last`` layout)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g).to(device, dtype)
    b = (0.5 * torch.randn(shape[1], generator=g)).to(device, dtype)
    r = (torch.randn(shape, generator=g) * 2).to(device, dtype)
    if channels_last:
        y = y.to(memory_format=torch.channels_last)
    if residual_channels_last if residual_channels_last is not None else channels_last:
        r = r.to(memory_format=torch.channels_last)
    return y, b, r


# -- references: closed forms, eager equality ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_and_carry_bias_references_match_float64(dtype: torch.dtype) -> None:
    y, r, w, b = make_ln_inputs((3, 5, 40), dtype)
    n = R.layer_norm_reference(y, w, b, 1e-5)
    assert n.dtype == dtype and n.is_contiguous()
    assert_within_ulps(n, layer_norm_truth(y, w, b, 1e-5), f"layer_norm reference {dtype}")
    carry = (0.3 * torch.randn(40, generator=torch.Generator().manual_seed(1))).to(dtype)
    s, n = R.add_layer_norm_reference(y, r, w, b, 1e-5, carry_bias=carry)
    if dtype == torch.float32:  # computed in float32 itself: two roundings
        assert_within_ulps(s, sum_truth(y, r) + carry.double(), "carried s float32")
    else:  # the half-precision three-term sum is exact in float32: one rounding
        assert_rounded_once(s, sum_truth(y, r) + carry.double(), f"carried s {dtype}")
    # the norm still reads the residual sum without the carried bias
    assert_within_ulps(n, layer_norm_truth(sum_truth(y, r).to(dtype), w, b, 1e-5), f"carried n {dtype}")


def biased_sum_truth(y: Tensor, r: Tensor, yb: Tensor, rb: Tensor) -> Tensor:
    """``(y + yb) + (r + rb)`` in float64, the bias vectors broadcast over the rows."""
    return (y.double() + yb.double()) + (r.double() + rb.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_input_and_residual_bias_references_match_float64(dtype: torch.dtype) -> None:
    y, r, w, b = make_ln_inputs((3, 5, 40), dtype)
    g = torch.Generator().manual_seed(3)
    yb, rb = ((0.4 * torch.randn(40, generator=g)).to(dtype) for _ in range(2))
    s, n = R.add_layer_norm_reference(y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb)
    truth = biased_sum_truth(y, r, yb, rb)
    assert_within_ulps(s, truth, f"biased s {dtype}")
    assert_within_ulps(n, layer_norm_truth(s, w, b, 1e-5), f"biased n {dtype}")
    # with a carried bias too: s gets it, n does not
    s2, n2 = R.add_layer_norm_reference(y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb, carry_bias=b)
    assert_within_ulps(s2, truth + b.double(), f"biased + carried s {dtype}")
    assert torch.equal(n2, n)
    # layer_norm of x + input_bias: the biased row rounded once, then normalised
    n = R.layer_norm_reference(y, w, b, 1e-5, input_bias=yb)
    biased = (y.double() + yb.double()).to(dtype)
    assert_within_ulps(n, layer_norm_truth(biased, w, b, 1e-5), f"layer_norm input_bias {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_add_layer_norm_reference_matches_float64(dtype: torch.dtype, affine: bool) -> None:
    y, r, w, b = make_ln_inputs((3, 5, 40), dtype)
    weight, bias = (w, b) if affine else (None, None)
    s, n = R.add_layer_norm_reference(y, r, weight, bias, 1e-5)
    assert s.dtype == n.dtype == dtype and s.shape == n.shape == y.shape
    assert s.is_contiguous() and n.is_contiguous()
    assert_rounded_once(s, sum_truth(y, r), f"reference s {dtype}")
    assert_within_ulps(n, layer_norm_truth(s, weight, bias, 1e-5), f"reference n {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bias_residual_add_reference_matches_float64(dtype: torch.dtype, channels_last: bool) -> None:
    y, b, r = make_conv_inputs((2, 6, 5, 7), dtype, channels_last=channels_last)
    out = R.bias_residual_add_reference(y, b, r)
    assert out.dtype == dtype and out.shape == y.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    assert_within_ulps(out, bias_residual_truth(y, b, r), f"reference {dtype}")
    y3, b3, r3 = make_conv_inputs((2, 6, 11), dtype)
    for bias, res in ((b3, None), (None, r3), (None, None)):
        out = R.bias_residual_add_reference(y3, bias, res)
        assert_within_ulps(out, bias_residual_truth(y3, bias, res), f"3-D {dtype}")
    # a skip convolution's bias on the residual: (y + b) + (r + rb)
    rb = (0.3 * torch.randn(6, generator=torch.Generator().manual_seed(4))).to(dtype)
    out = R.bias_residual_add_reference(y, b, r, residual_bias=rb)
    truth = bias_residual_truth(y, b, r) + rb.double().view(1, -1, 1, 1)
    assert_within_ulps(out, truth, f"residual_bias {dtype}")


def test_references_are_bit_identical_to_eager_float32() -> None:
    """Why fused models equal unfused ones bit for bit on the CPU in float32: same calls, same order."""
    y, r, _, _ = make_ln_inputs((2, 9, 64), torch.float32)
    norm = nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
        s, n = R.add_layer_norm_reference(y, r, norm.weight, norm.bias, norm.eps)
        eager_s = y + r
        assert torch.equal(s, eager_s)
        assert torch.equal(n, norm(eager_s))
        assert torch.equal(n, F.layer_norm(eager_s, (64,), norm.weight, norm.bias, norm.eps))
        _, n_plain = R.add_layer_norm_reference(y, r, None, None, 1e-6)
        assert torch.equal(n_plain, F.layer_norm(eager_s, (64,), None, None, 1e-6))
    for channels_last in (False, True):
        y4, b4, r4 = make_conv_inputs((2, 8, 5, 6), torch.float32, channels_last=channels_last)
        eager = r4 + (y4 + b4.view(1, -1, 1, 1))
        out = R.bias_residual_add_reference(y4, b4, r4)
        assert torch.equal(out, eager) and out.stride() == y4.stride()
    y3, b3, r3 = make_conv_inputs((2, 8, 13), torch.float32)
    assert torch.equal(R.bias_residual_add_reference(y3, b3, r3), r3 + (y3 + b3.view(1, -1, 1)))


def test_references_make_outputs_dense() -> None:
    y, r, w, b = make_ln_inputs((4, 6, 24), torch.bfloat16)
    s, n = R.add_layer_norm_reference(y.transpose(0, 1), r.transpose(0, 1), w, b, 1e-5)
    assert s.is_contiguous() and n.is_contiguous()
    assert torch.equal(s, (y + r).transpose(0, 1))
    y4, b4, _ = make_conv_inputs((2, 6, 5, 7), torch.float16)
    strided = y4.transpose(2, 3)  # neither contiguous nor channels_last
    out = R.bias_residual_add_reference(strided, b4, None)
    assert out.is_contiguous() and torch.equal(out, (strided.float() + b4.float().view(1, -1, 1, 1)).half())


# -- dispatch and errors -------------------------------------------------------------------------------------
def _refuse(*args: object, **kwargs: object) -> Tensor:
    raise AssertionError("the Triton path must not run here")


def test_auto_backend_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "add_layer_norm_triton", _refuse)
    monkeypatch.setattr(R, "bias_residual_add_triton", _refuse)
    y, r, w, b = make_ln_inputs((2, 7, 32), torch.float16)
    for got, want in zip(
        R.add_layer_norm(y, r, w, b, 1e-5), R.add_layer_norm_reference(y, r, w, b, 1e-5), strict=True
    ):
        assert torch.equal(got, want)
    y4, b4, r4 = make_conv_inputs((2, 6, 4, 4), torch.bfloat16, channels_last=True)
    assert torch.equal(R.bias_residual_add(y4, b4, r4), R.bias_residual_add_reference(y4, b4, r4))
    assert torch.equal(
        R.add_layer_norm(y, r, w, b, 1e-5, backend="reference")[1],
        R.add_layer_norm_reference(y, r, w, b, 1e-5)[1],
    )


def test_auto_backend_falls_back_above_the_kernel_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels otherwise eligible (as for CUDA tensors), sizes beyond their limits use the reference
    under ``auto`` and are refused, with the limit named, under ``triton``."""
    monkeypatch.setattr(R, "_use_triton", lambda *args: True)
    monkeypatch.setattr(R, "MAX_LN_COLUMNS", 32)
    monkeypatch.setattr(R, "MAX_INDEX", 8)
    y, r, _, _ = make_ln_inputs((2, 3, 40), torch.float32)
    y4, b4, r4 = make_conv_inputs((2, 6, 3, 3), torch.float32)
    with monkeypatch.context() as m:
        m.setattr(R, "add_layer_norm_triton", _refuse)
        m.setattr(R, "bias_residual_add_triton", _refuse)
        assert torch.equal(
            R.add_layer_norm(y, r, None, None, 1e-5)[1], R.add_layer_norm_reference(y, r, None, None, 1e-5)[1]
        )
        assert torch.equal(R.bias_residual_add(y4, b4, r4), R.bias_residual_add_reference(y4, b4, r4))
    with pytest.raises(ValueError, match="at most 32 values"):
        R.add_layer_norm(y, r, None, None, 1e-5, backend="triton")
    with pytest.raises(ValueError, match="spatial size below 8"):
        R.bias_residual_add(y4, b4, r4, backend="triton")


def test_autograd_falls_back_or_is_refused() -> None:
    y, r, w, b = make_ln_inputs((2, 5, 16), torch.float32)
    w.requires_grad_(True)
    _, n = R.add_layer_norm(y, r, w, b, 1e-5)  # auto: the differentiable reference
    n.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(RuntimeError, match="no backward"):
        R.add_layer_norm(y, r, w, b, 1e-5, backend="triton")
    y4, b4, r4 = make_conv_inputs((2, 6, 4, 4), torch.float32)
    r4.requires_grad_(True)
    R.bias_residual_add(y4, b4, r4).sum().backward()
    assert r4.grad is not None and torch.equal(r4.grad, torch.ones_like(r4))
    with pytest.raises(RuntimeError, match="no backward"):
        R.bias_residual_add(y4, b4, r4, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this session runs the Triton interpreter")
    y, r, w, b = make_ln_inputs((2, 5, 16), torch.float16)
    y4, b4, r4 = make_conv_inputs((2, 6, 4, 4), torch.float16)
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        R.add_layer_norm(y, r, w, b, 1e-5, backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        R.bias_residual_add(y4, b4, r4, backend="triton")


def test_triton_functions_refuse_float64_and_bad_blocks() -> None:
    y, r, _, _ = make_ln_inputs((2, 3, 8), torch.float64)
    with pytest.raises(ValueError, match="float64"):
        R.add_layer_norm_triton(y, r, None, None, 1e-5)
    with pytest.raises(ValueError, match="power of two"):
        R.add_layer_norm_triton(y.float(), r.float(), None, None, 1e-5, max_block=24)
    y4, b4, r4 = make_conv_inputs((2, 6, 4, 4), torch.float64)
    with pytest.raises(ValueError, match="float64"):
        R.bias_residual_add_triton(y4, b4, r4)
    with pytest.raises(ValueError, match=r"power of two in \[16, 2048\]"):
        R.bias_residual_add_triton(y4.float(), b4.float(), r4.float(), block=100)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda y: R.add_layer_norm(y, y[:1], None, None, 1e-5), "residual must be a tensor of y's shape"),
        (lambda y: R.add_layer_norm(y, y.half(), None, None, 1e-5), "dtype float32"),
        (lambda y: R.add_layer_norm(y, y, torch.ones(6), None, 1e-5), "weight must be None or a 1-D"),
        (lambda y: R.add_layer_norm(y, y, None, torch.ones(2, 4), 1e-5), "bias must be None or a 1-D"),
        (lambda y: R.add_layer_norm(y, y, None, None, -1.0), "eps must be a float >= 0"),
        (lambda y: R.bias_residual_add(y, None, None, residual_bias=torch.ones(6)), "it needs a residual"),
        (lambda y: R.bias_residual_add(y, None, y, residual_bias=torch.ones(5)), "residual_bias must"),
        (lambda y: R.layer_norm(y, None, None, 1e-5, input_bias=torch.ones(3)), "input_bias must be None"),
        (lambda y: R.add_layer_norm(y, None, None, None, 1e-5, residual_bias=y), "need a residual"),
        (lambda y: R.add_layer_norm(y, y, None, None, 1e-5, carry_bias=y), "carry_bias must be None or"),
        (lambda y: R.layer_norm(y, torch.ones(3), None, 1e-5), "weight must be None or a 1-D"),
        (lambda y: R.layer_norm(y.long(), None, None, 1e-5), "floating-point tensor"),
        (lambda y: R.add_layer_norm(y.long(), y.long(), None, None, 1e-5), "floating-point tensor"),
        (lambda y: R.add_layer_norm(y, y, None, None, 1e-5, backend="cuda"), "valid: auto, triton"),  # type: ignore[arg-type]
        (lambda y: R.bias_residual_add(y, torch.ones(8), None), r"bias must be None or a 1-D .* 6 values"),
        (lambda y: R.bias_residual_add(y, None, y[..., :4]), "residual must be None or a tensor"),
        (lambda y: R.bias_residual_add(y, None, y.bfloat16()), "dtype float32"),
        (lambda y: R.bias_residual_add(y[0, 0, 0], None, None), r"\(N, C, \*spatial\)"),
        (lambda y: R.bias_residual_add(y, torch.ones(6).long(), None), "floating-point"),
        (lambda y: R.bias_residual_add(y, None, None, backend="gpu"), "valid: auto, triton, reference"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_argument_errors_say_what_is_valid(call: Callable[[Tensor], object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        call(torch.randn(2, 6, 4, 8))


# -- the kernels in the Triton interpreter (CPU) -------------------------------------------------------------
def _bf16_toward_zero(x: Tensor) -> Tensor:
    """float32 -> bfloat16 rounded toward zero (the low 16 bits of the float32 pattern dropped)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def assert_kernel_rounding(out: Tensor, value32: Tensor, what: str) -> None:
    """``out`` is the float32 ``value32`` rounded once to ``out.dtype`` -- to nearest, or, for bf16 only,
    toward zero: the Triton interpreter (3.8) converts float32 to bfloat16 by dropping the low bits (numpy
    has no bfloat16; on a GPU the conversion rounds to nearest, checked there against the reference)."""
    if torch.equal(out, value32.to(out.dtype)):
        return
    assert out.dtype == torch.bfloat16 and torch.equal(out, _bf16_toward_zero(value32)), (
        f"{what}: not the float32 value rounded once ({compare_ulps(out, value32.double(), noise=0.0)})"
    )


def _check_add_layer_norm_kernel(
    y: Tensor, r: Tensor, w: Tensor | None, b: Tensor | None, what: str, max_block: int = 2048
) -> None:
    s, n = R.add_layer_norm_triton(y, r, w, b, 1e-5, max_block=max_block)
    assert s.is_contiguous() and n.is_contiguous() and s.shape == n.shape == y.shape, what
    if y.dtype == torch.bfloat16:  # interpreter rounding toward zero (see assert_kernel_rounding)
        assert_within_ulps(s, sum_truth(y, r), f"{what} s")
        assert_kernel_rounding(s, y.float() + r.float(), f"{what} s")
    else:
        assert_rounded_once(s, sum_truth(y, r), f"{what} s")
        assert torch.equal(s, R.add_layer_norm_reference(y, r, w, b, 1e-5)[0]), what
    assert_within_ulps(n, layer_norm_truth(s, w, b, 1e-5), f"{what} n")


def _check_bias_residual_kernel(
    y: Tensor, bias: Tensor | None, res: Tensor | None, what: str, block: int | None = None
) -> None:
    out = R.bias_residual_add_triton(y, bias, res, block=block)
    dense = y if y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last) else y.contiguous()
    assert out.stride() == dense.stride(), f"{what}: memory format not kept: {out.stride()} vs {y.stride()}"
    assert_within_ulps(out, bias_residual_truth(y, bias, res), what)
    # the reference's float32 value, before its one rounding: the kernel makes the same float32 adds
    value32 = R.bias_residual_add_reference(y.float(), bias, res.float() if res is not None else None)
    assert_kernel_rounding(out, value32, what)


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    ln_cases = [
        # shape, dtype, affine, max_block
        ((2, 77, 320), torch.float16, True, 2048),  # SD-1.5 text-length tokens, 4 rows per program
        ((2, 77, 320), torch.bfloat16, True, 2048),
        ((3, 5, 40), torch.float32, True, 128),  # odd rows: 2-row blocks, the last one partial
        ((3, 5, 40), torch.bfloat16, False, 2048),  # one 16-row block, 15 valid
        ((2, 7, 1280), torch.float16, True, 2048),  # one row per program
        ((2, 7, 1280), torch.float32, True, 2048),
        ((3, 7, 100), torch.bfloat16, True, 2048),  # C not a power of two
        ((11, 100), torch.float32, False, 256),
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for shape, dtype, affine, max_block in ln_cases:
            y, r, w, b = make_ln_inputs(shape, dtype, seed=len(done))
            weight, bias = (w, b) if affine else (None, None)
            what = f"add_layer_norm{shape} {dtype} affine={affine} max_block={max_block}"
            _check_add_layer_norm_kernel(y, r, weight, bias, what, max_block)
            done.append(what)
        y, r, w, b = make_ln_inputs((6, 5, 48), torch.float16)
        w2 = torch.stack([w, -w], dim=1)[:, 0]  # a view with stride 2
        _check_add_layer_norm_kernel(y.transpose(0, 1), r.transpose(0, 1), w2, b, "strided inputs")
        done.append("add_layer_norm strided inputs")
        s, n = R.add_layer_norm_triton(torch.empty(0, 32), torch.empty(0, 32), None, None, 1e-5)
        assert s.shape == n.shape == (0, 32)
        for shape, dtype, max_block in (((3, 5, 40), torch.float16, 128), ((2, 7, 100), torch.float32, 2048)):
            y, r, w, b = make_ln_inputs(shape, dtype, seed=len(done))
            n = R.layer_norm_triton(y.transpose(0, 1), w, b, 1e-5, max_block=max_block)
            assert n.is_contiguous() and n.shape == y.transpose(0, 1).shape
            assert_within_ulps(n, layer_norm_truth(y.transpose(0, 1), w, b, 1e-5), f"layer_norm{shape}")
            done.append(f"layer_norm{shape} {dtype}")
            carry = (0.3 * torch.randn(shape[-1], generator=torch.Generator().manual_seed(2))).to(dtype)
            s, n = R.add_layer_norm_triton(y, r, w, b, 1e-5, carry_bias=carry, max_block=max_block)
            if dtype == torch.float32:
                assert_within_ulps(s, sum_truth(y, r) + carry.double(), f"carried s{shape}")
            else:
                assert_rounded_once(s, sum_truth(y, r) + carry.double(), f"carried s{shape}")
            ref_s, _ = R.add_layer_norm_reference(y, r, w, b, 1e-5, carry_bias=carry)
            assert torch.equal(s, ref_s), f"carried s{shape}"
            assert_within_ulps(
                n, layer_norm_truth(sum_truth(y, r).to(dtype), w, b, 1e-5), f"carried n{shape}"
            )
            done.append(f"add_layer_norm{shape} {dtype} carry_bias")
            g = torch.Generator().manual_seed(5)
            yb, rb = ((0.4 * torch.randn(shape[-1], generator=g)).to(dtype) for _ in range(2))
            for carried in (None, carry):
                s, n = R.add_layer_norm_triton(
                    y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb, carry_bias=carried, max_block=max_block
                )
                ref_s, _ = R.add_layer_norm_reference(
                    y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb, carry_bias=carried
                )
                assert torch.equal(s, ref_s), f"biased s{shape} carry={carried is not None}"
                truth = biased_sum_truth(y, r, yb, rb) + (0 if carried is None else carried.double())
                assert_within_ulps(s, truth, f"biased s{shape}")
                # the norm reads the rounded biased sum (without a carried bias)
                stream = ref_s if carried is None else biased_sum_truth(y, r, yb, rb).to(dtype)
                assert_within_ulps(n, layer_norm_truth(stream, w, b, 1e-5), f"biased n{shape}")
            n = R.layer_norm_triton(y, w, b, 1e-5, input_bias=yb, max_block=max_block)
            biased = (y.double() + yb.double()).to(dtype)
            assert_within_ulps(n, layer_norm_truth(biased, w, b, 1e-5), f"layer_norm input_bias{shape}")
            done.append(f"add_layer_norm{shape} {dtype} input/residual bias")

        br_cases = [
            # shape, dtype, y channels_last, residual channels_last, bias, residual, block
            ((2, 6, 5, 7), torch.float32, False, False, True, True, 16),  # blocks span channels
            ((2, 6, 4, 8), torch.float16, False, False, True, True, 16),  # one channel per block
            ((2, 6, 4, 8), torch.bfloat16, False, False, True, True, None),  # 384 elements, one block
            ((2, 6, 5, 7), torch.bfloat16, True, True, True, True, 32),  # channels_last
            ((3, 10, 3, 5), torch.float16, True, False, True, True, 64),  # residual NCHW, y channels_last
            ((3, 10, 3, 5), torch.float32, False, True, True, True, 64),  # residual channels_last, y NCHW
            ((2, 6, 5, 7), torch.float16, True, True, False, True, 16),  # no bias
            ((2, 6, 5, 7), torch.bfloat16, False, False, True, False, 16),  # no residual
            ((1, 3, 1, 1), torch.float32, True, True, True, True, None),  # 1x1
        ]
        for shape, dtype, cl, rcl, has_b, has_r, block in br_cases:
            y, b, r = make_conv_inputs(
                shape, dtype, channels_last=cl, residual_channels_last=rcl, seed=len(done)
            )
            bias, res = (b if has_b else None), (r if has_r else None)
            what = f"bias_residual_add{shape} {dtype} cl={cl} residual cl={rcl} bias={has_b} res={has_r}"
            _check_bias_residual_kernel(y, bias, res, what, block)
            done.append(what)
        for shape, block in (((2, 5, 37), 16), ((3, 7, 32), 32), ((2, 4, 3, 5, 2), 16)):  # 3-D, 5-D
            y, b, r = make_conv_inputs(shape, torch.bfloat16, seed=len(done))
            _check_bias_residual_kernel(y, b, r, f"bias_residual_add{shape}", block)
            done.append(f"bias_residual_add{shape}")
        for shape, cl, block in (
            ((2, 6, 5, 7), True, 16),
            ((2, 6, 4, 8), False, 16),
            ((2, 6, 5, 7), False, 16),
        ):
            y, b, r = make_conv_inputs(shape, torch.float16, channels_last=cl, seed=len(done))
            rb = (0.3 * torch.randn(shape[1], generator=torch.Generator().manual_seed(6))).to(torch.float16)
            out = R.bias_residual_add_triton(y, b, r, residual_bias=rb, block=block)
            ref = R.bias_residual_add_reference(y, b, r, residual_bias=rb)
            assert torch.equal(out, ref), f"residual_bias{shape} cl={cl}"
            done.append(f"bias_residual_add{shape} cl={cl} residual_bias")
        # channels_last without a block: the pixel-rows kernel; small tiles give partial row / column tiles
        tile = R.ROWS_TILE
        try:
            R.ROWS_TILE = 64
            rows_cases = [
                # shape, dtype, residual channels_last, bias, residual, residual bias
                ((2, 6, 5, 7), torch.float16, True, True, True, True),  # 8 x 8 tiles, last rows partial
                ((3, 200, 3, 5), torch.bfloat16, True, True, True, False),  # 4 column tiles, last partial
                ((3, 10, 3, 5), torch.float32, False, True, True, True),  # NCHW residual copied
                ((2, 6, 5, 7), torch.float16, True, False, True, True),  # no bias
                ((2, 6, 5, 7), torch.bfloat16, True, True, False, False),  # no residual
            ]
            for shape, dtype, rcl, has_b, has_r, has_rb in rows_cases:
                y, b, r = make_conv_inputs(
                    shape, dtype, channels_last=True, residual_channels_last=rcl, seed=len(done)
                )
                bias, res = (b if has_b else None), (r if has_r else None)
                what = f"bias_residual_add rows{shape} {dtype} residual cl={rcl} bias={has_b} res={has_r}"
                _check_bias_residual_kernel(y, bias, res, what)
                if has_rb:
                    rb = (0.3 * torch.randn(shape[1], generator=torch.Generator().manual_seed(7))).to(dtype)
                    out = R.bias_residual_add_triton(y, bias, res, residual_bias=rb)
                    ref = R.bias_residual_add_reference(y, bias, res, residual_bias=rb)
                    assert torch.equal(out, ref), f"{what} residual_bias"
                done.append(what)
        finally:
            R.ROWS_TILE = tile
        y, b, r = make_conv_inputs((2, 6, 5, 7), torch.float16)
        strided_bias = torch.stack([b, -b], dim=1)[:, 0]  # a view with stride 2
        assert strided_bias.stride() == (2,)
        _check_bias_residual_kernel(y.transpose(2, 3), strided_bias, r.transpose(2, 3), "strided y, bias", 16)
        done.append("bias_residual_add strided y and bias")
        assert R.bias_residual_add_triton(torch.empty(0, 4, 3, 3), None, None).shape == (0, 4, 3, 3)
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_residual_kernels_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 36, done


# -- GPU -----------------------------------------------------------------------------------------------------
LN_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (2, 77, 768)]
CONV_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (1, 128, 512, 512), (1, 512, 64, 64)]


def _skip_without_bf16(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")


@pytest.mark.gpu
class TestKernelsOnCuda:
    """The kernels on CUDA at SD-1.5 UNet / VAE shapes against the float32 reference (``s`` and the bias /
    residual add bit for bit; ``n`` within one output ulp + float32 noise), and under CUDA-graph replay."""

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_add_layer_norm_sd15_shapes(self, dtype: torch.dtype) -> None:
        _skip_without_bf16(dtype)
        failures = []
        with torch.no_grad():
            for shape in LN_SHAPES:
                y, r, w, b = make_ln_inputs(shape, dtype, device="cuda", seed=shape[-1])
                s, n = R.add_layer_norm_triton(y, r, w, b, 1e-5)
                ref_s, ref_n = R.add_layer_norm_reference(y, r, w, b, 1e-5)
                if not torch.equal(s, ref_s):
                    failures.append(f"{shape} {dtype}: s differs from the reference")
                for name, truth in (
                    ("float32 reference", ref_n),
                    ("float64", layer_norm_truth(s, w, b, 1e-5)),
                ):
                    report = compare_ulps(n, truth)
                    if not report.ok():
                        failures.append(f"{shape} {dtype} n vs {name}: {report}")
        assert not failures, "\n".join(failures)

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_layer_norm_and_carry_bias_sd15_shapes(self, dtype: torch.dtype) -> None:
        _skip_without_bf16(dtype)
        failures = []
        with torch.no_grad():
            for shape in LN_SHAPES:
                y, r, w, b = make_ln_inputs(shape, dtype, device="cuda", seed=shape[-1])
                n = R.layer_norm_triton(y, w, b, 1e-5)
                report = compare_ulps(n, layer_norm_truth(y, w, b, 1e-5))
                if not report.ok():
                    failures.append(f"layer_norm {shape} {dtype}: {report}")
                s, n = R.add_layer_norm_triton(y, r, w, b, 1e-5, carry_bias=b)
                ref_s, ref_n = R.add_layer_norm_reference(y, r, w, b, 1e-5, carry_bias=b)
                if not torch.equal(s, ref_s):
                    failures.append(f"carry {shape} {dtype}: s differs from the reference")
                report = compare_ulps(n, ref_n)
                if not report.ok():
                    failures.append(f"carry {shape} {dtype} n: {report}")
                yb, rb = 0.5 * b, -0.25 * w
                s, n = R.add_layer_norm_triton(
                    y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb, carry_bias=b
                )
                ref_s, ref_n = R.add_layer_norm_reference(
                    y, r, w, b, 1e-5, input_bias=yb, residual_bias=rb, carry_bias=b
                )
                if not torch.equal(s, ref_s):
                    failures.append(f"biased {shape} {dtype}: s differs from the reference")
                if not (report := compare_ulps(n, ref_n)).ok():
                    failures.append(f"biased {shape} {dtype} n: {report}")
                n = R.layer_norm_triton(y, w, b, 1e-5, input_bias=yb)
                if not (report := compare_ulps(n, R.layer_norm_reference(y, w, b, 1e-5, input_bias=yb))).ok():
                    failures.append(f"layer_norm input_bias {shape} {dtype}: {report}")
        assert not failures, "\n".join(failures)

    def test_add_layer_norm_float32_and_wide_rows(self) -> None:
        with torch.no_grad():
            for shape in ((2, 77, 320), (3, 5, 100), (4, 2048), (2, 8192)):
                y, r, w, b = make_ln_inputs(shape, torch.float32, device="cuda")
                s, n = R.add_layer_norm_triton(y, r, w, b, 1e-5)
                assert torch.equal(s, y + r)
                assert_within_ulps(n, layer_norm_truth(s, w, b, 1e-5), f"fp32 {shape}")
            y, r, w, b = make_ln_inputs((2, 8193), torch.float16, device="cuda")
            with pytest.raises(ValueError, match="at most 8192"):
                R.add_layer_norm_triton(y, r, w, b, 1e-5)
            assert torch.equal(
                R.add_layer_norm(y, r, w, b, 1e-5)[1], R.add_layer_norm_reference(y, r, w, b, 1e-5)[1]
            )

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
    def test_bias_residual_add_sd15_shapes(self, dtype: torch.dtype, channels_last: bool) -> None:
        _skip_without_bf16(dtype)
        failures = []
        with torch.no_grad():
            for shape in CONV_SHAPES:
                variants = (
                    (channels_last, True, True),
                    (not channels_last, True, True),
                    (channels_last, False, True),
                    (channels_last, True, False),
                )
                for rcl, has_b, has_r in variants:
                    y, b, r = make_conv_inputs(
                        shape, dtype, channels_last=channels_last, residual_channels_last=rcl, device="cuda"
                    )
                    bias, res = (b if has_b else None), (r if has_r else None)
                    out = R.bias_residual_add_triton(y, bias, res)
                    ref = R.bias_residual_add_reference(y, bias, res)
                    what = f"{shape} {dtype} cl={channels_last} residual cl={rcl} bias={has_b} res={has_r}"
                    if out.stride() != y.stride():
                        failures.append(f"{what}: strides {out.stride()} vs {y.stride()}")
                    report = compare_ulps(out, ref)
                    if not report.ok() or not torch.equal(out, ref):
                        failures.append(f"{what} vs the float32 reference: {report}")
                    if has_r:
                        out = R.bias_residual_add_triton(y, bias, res, residual_bias=0.5 * b)
                        if not torch.equal(
                            out, R.bias_residual_add_reference(y, bias, res, residual_bias=0.5 * b)
                        ):
                            failures.append(f"{what} residual_bias: differs from the float32 reference")
        assert not failures, "\n".join(failures)

    def test_kernels_replay_in_a_cuda_graph(self) -> None:
        """Through the ``auto`` dispatchers (no host synchronisation in them), captured and replayed."""
        y, r, w, b = make_ln_inputs((2, 1024, 640), torch.float16, device="cuda")
        cy, cb, cr = make_conv_inputs((2, 320, 64, 64), torch.float16, channels_last=True, device="cuda")

        def step() -> tuple[Tensor, Tensor, Tensor]:
            s, n = R.add_layer_norm(y, r, w, b, 1e-5)
            return s, n, R.bias_residual_add(cy, cb, cr)

        with torch.no_grad():
            eager = step()  # compiles
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = step()
            y.mul_(-1)
            r.add_(0.5)
            cy.mul_(0.5)
            cr.mul_(-1)
            graph.replay()
            torch.cuda.synchronize()
            fresh = step()
            for got, want, old in zip(static, fresh, eager, strict=True):
                assert torch.equal(got, want)
                assert not torch.equal(got, old)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
