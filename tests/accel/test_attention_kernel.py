"""The flash-attention forward of ``ldm_sdk.accel.attention_kernel``.

CPU (always):

* the float32 reference against float64 ``F.scaled_dot_product_attention`` (fp32 / bf16 / fp16, head dims
  40 / 80 / 160, 77 keys, strided inputs, explicit and negative scales), its ``(B, Nq, H, D)`` output
  layout, empty sizes, and its autograd;
* the head-dim split and the launch plan rule, plan validation;
* dispatch (``auto`` falls back off CUDA, for fp32, for head dims the kernel does not take and under
  autograd; ``triton`` refuses them), argument errors;
* the Triton kernel itself through the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before Triton
  is imported, so :func:`test_attention_kernel_in_the_interpreter` runs this file as a script in a
  subprocess (:func:`interpreter_checks`), with fresh buffers NaN-filled so an unwritten output fails. Head
  dims 40 / 80 / 160 (two chunks, the second masked for 40), 64 (one chunk), 24 (one masked chunk) and 16;
  ragged key counts (77-like tails, fewer keys than a block) and exact multiples of the key block; query
  counts that are not a multiple of the query block; ``view(b, n, h, d).transpose(1, 2)`` views of a
  fused QKV projection, unaligned strides, a strided head dim (copied); a padded single-chunk plan; zero
  and negative scales; the default plan; a recorded (not launched) call; fp16 and bf16, against float64.
  Small block plans keep the interpreted run to a few seconds.
* :func:`test_ragged_plans_in_the_interpreter` (:func:`ragged_plan_checks`): every tile plan of the
  benchmark's sweep, the padded plan and the exp2 / lazy-rescale options on ragged key counts (a full block
  plus a tail, fewer keys than a block, ragged queries), and the default plans of all SD-1.5 UNet attentions
  (D 40 / 80 / 160, self and 77-key cross) at reduced token counts, on inputs stored inside NaN guards (a read
  past a tensor poisons the output); the lazy rescale with a growing maximum; the Triton software exp2
  bit-identical to its numpy mirror (:func:`test_software_exp2_relative_error` bounds that one's relative
  error against float64 ``exp2`` over ``[-126, 0]``: < 2**-22 at degree 5).

Tolerance (:func:`assert_attention_close`): ``|out - truth| <= ulp(truth) + eps(dtype) * m`` elementwise,
where ``truth`` is the float64 attention of the same (rounded) inputs and ``m = softmax(q k^T s) @ |v|``
(float64) is the magnitude of the terms summed into the element. Why: like every flash-attention kernel,
this one rounds the softmax weights ``p`` (in ``[0, 1]``) to the input dtype for the ``p v`` tensor-core
product; each weight then carries a relative error of at most ``eps / 2`` (round to nearest), so the sum
``sum_j p_j v_j / l`` is off by at most ``eps / 2 * m``; the final rounding adds half an output ulp, and
float32 score / exponent errors (~1e-6 relative) are far below ``eps * m`` for fp16 / bf16. The bound
allows twice that because the Triton interpreter converts float32 to bfloat16 by truncation (toward zero:
a full ``eps`` per weight and a full ulp on the output). It is relative to ``m`` rather than to the output
because an output that is small through cancellation (an average of mixed-sign values) keeps the absolute
error of its terms. The float32 reference is held to the same form with ``eps = 2**-16``: its float32
scores carry an absolute error of about ``D * 2**-24 * |q| |k|`` (up to ~1e-5 here), which the exponential
turns into that relative error of the weights (the kernel's scores have it too, far below fp16's eps).

GPU (mark ``gpu``): the kernel at the SD-1.5 UNet shapes (batch 2; self-attention over 4096 / 1024 / 256 /
64 tokens with head dims 40 / 80 / 160 / 160, and cross-attention over 77 keys) against fp32 SDPA, fp16 /
bf16, on views of a fused QKV projection; and replay under a CUDA graph.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel import attention_kernel as A
from ldm_sdk.accel.triton_kernels import KernelRecorder, output_ulp, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

HALF = [torch.float16, torch.bfloat16]
REFERENCE_EPS = 2.0**-16  # the float32 reference's weights (see the module doc)


# -- float64 truth and the error bound -----------------------------------------------------------------------
def attention_truth(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    """``(softmax(q k^T s) v, softmax(q k^T s) |v|)`` in float64 through SDPA (math on the CPU)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    return (
        F.scaled_dot_product_attention(qd, kd, vd, scale=scale),
        F.scaled_dot_product_attention(qd, kd, vd.abs(), scale=scale),
    )


def attention_error(out: Tensor, truth: Tensor, magnitude: Tensor, eps: float) -> tuple[float, Tensor]:
    """The largest ``|out - truth| / (ulp(truth) + eps * magnitude)`` (<= 1: within the bound; NaN if
    any output is NaN) and the elementwise ratio."""
    diff = (out.double() - truth.double()).abs()
    ratio = diff / (output_ulp(truth, out.dtype) + eps * magnitude.double())
    worst = float("nan") if torch.isnan(ratio).any() else float(ratio.max()) if ratio.numel() else 0.0
    return worst, ratio


def assert_attention_close(
    out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float | None, what: str, *, eps: float | None = None
) -> None:
    """``out`` within ``ulp(truth) + eps * m`` of the float64 attention (see the module doc); ``eps``
    defaults to the input dtype's machine epsilon."""
    assert out.shape == (*q.shape[:3], v.shape[-1]), f"{what}: shape {tuple(out.shape)}"
    assert out.dtype == q.dtype, f"{what}: dtype {out.dtype}"
    assert out.transpose(1, 2).is_contiguous(), f"{what}: output strides {out.stride()} are not (B, Nq, H, D)"
    truth, magnitude = attention_truth(q, k, v, scale)
    worst, _ = attention_error(out, truth, magnitude, torch.finfo(out.dtype).eps if eps is None else eps)
    assert worst <= 1.0, (
        f"{what}: error {worst:.3g} x the bound (max |diff| {(out.double() - truth).abs().max():.3e})"
    )


def make_qkv(
    b: int,
    h: int,
    nq: int,
    nk: int,
    d: int,
    dtype: torch.dtype,
    *,
    device: str = "cpu",
    seed: int = 0,
    layout: str = "fused",
) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values scaled like a transformer's (unit-variance projections, so ``q k^T / sqrt
    D`` is about N(0, 1)) and a few sharper rows. ``layout``: ``"fused"`` -- ``view(b, n, h, d).transpose(1,
    2)`` views of one fused QKV projection output (self-attention) or of a Q and a fused KV one; ``"heads"``
    -- the same of separate projection outputs; ``"contiguous"`` -- dense ``(B, H, N, D)``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:  # made in the target dtype / device first, so the views stay views
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def heads(t: Tensor, n: int) -> Tensor:
        return t.view(b, n, h, d).transpose(1, 2)

    hd = h * d
    if layout == "fused" and nq == nk:
        qkv = randn(b, nq, 3 * hd)
        qkv[:, :2] *= 3  # a few sharper softmax rows
        return heads(qkv[..., :hd], nq), heads(qkv[..., hd : 2 * hd], nk), heads(qkv[..., 2 * hd :], nk)
    if layout == "fused":
        kv = randn(b, nk, 2 * hd)
        return heads(randn(b, nq, hd), nq), heads(kv[..., :hd], nk), heads(kv[..., hd:], nk)
    if layout == "heads":
        return heads(randn(b, nq, hd), nq), heads(randn(b, nk, hd), nk), heads(randn(b, nk, hd), nk)
    return randn(b, h, nq, d), randn(b, h, nk, d), randn(b, h, nk, d)


def test_make_qkv_layouts() -> None:
    q, k, v = make_qkv(2, 3, 5, 5, 8, torch.float16)
    assert q.stride() == (5 * 72, 8, 72, 1) and k.stride() == q.stride() and v.data_ptr() == q.data_ptr() + 96
    q, k, v = make_qkv(2, 3, 5, 7, 8, torch.bfloat16)
    assert q.stride() == (5 * 24, 8, 24, 1) and k.stride() == (7 * 48, 8, 48, 1) == v.stride()
    q, k, _ = make_qkv(2, 3, 5, 7, 8, torch.float16, layout="heads")
    assert q.stride() == (5 * 24, 8, 24, 1) and k.stride() == (7 * 24, 8, 24, 1)
    assert make_qkv(2, 3, 5, 7, 8, torch.float16, layout="contiguous")[1].is_contiguous()


# -- reference -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "scale", "layout"),
    [
        ((2, 2, 24, 24, 40), None, "fused"),
        ((1, 2, 24, 77, 40), None, "fused"),
        ((2, 1, 9, 13, 80), 0.3, "heads"),
        ((1, 2, 5, 77, 160), -0.05, "contiguous"),
    ],
)
def test_reference_matches_float64_sdpa(
    dtype: torch.dtype, shape: tuple[int, ...], scale: float | None, layout: str
) -> None:
    q, k, v = make_qkv(*shape, dtype, layout=layout)
    out = A.attention_reference(q, k, v, scale)
    assert_attention_close(out, q, k, v, scale, f"reference {shape} {dtype}", eps=REFERENCE_EPS)


def test_reference_in_float64_is_sdpa_and_chunks_long_query_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(2, 3, 37, 77, 40, torch.float64)
    truth = F.scaled_dot_product_attention(q, k, v)
    out = A.attention_reference(q, k, v)
    assert out.dtype == torch.float64 and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(A, "REFERENCE_SCORES", 2 * 3 * 77 * 5)  # 5 query rows at a time, 8 chunks
    torch.testing.assert_close(A.attention_reference(q, k, v), truth, rtol=1e-12, atol=1e-12)


def test_reference_empty_sizes_and_autograd() -> None:
    q, k, v = make_qkv(1, 2, 4, 6, 16, torch.float32, layout="contiguous")
    empty_keys = A.attention_reference(q, k[:, :, :0], v[:, :, :0])
    assert torch.equal(empty_keys, torch.zeros_like(q))  # as SDPA: an empty softmax gives zeros
    assert torch.equal(empty_keys, F.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0]))
    assert A.attention_reference(q[:, :, :0], k, v).shape == (1, 2, 0, 16)
    q.requires_grad_(True)
    out = A.flash_attention(q, k, v)  # auto under autograd: the reference
    out.sum().backward()
    expected = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).sum(), q)[0]
    assert q.grad is not None
    torch.testing.assert_close(q.grad, expected, rtol=1e-5, atol=1e-6)


# -- head-dim split and plans --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("d", "chunks"),
    [(40, (32, 16)), (80, (64, 16)), (160, (128, 32)), (64, (64, 0)), (128, (128, 0)), (16, (16, 0)),
     (24, (32, 0)), (96, (64, 32)), (112, (128, 0)), (120, (128, 0)), (136, (128, 16)), (200, (256, 0)),
     (256, (256, 0)), (8, (16, 0))],
)  # fmt: skip
def test_split_head_dim(d: int, chunks: tuple[int, int]) -> None:
    assert A.split_head_dim(d) == chunks
    d0, d1 = chunks
    assert d0 + d1 >= d and d0 + d1 <= max(16, 1 << (d - 1).bit_length())


def test_plan_rule_at_sd15_shapes() -> None:
    p = A.plan_attention(4096, 4096, 40, batch_heads=16)
    assert (p.block_m, p.block_n, p.d0, p.d1, p.num_warps) == (128, 64, 32, 16, 8) and p.width == 48
    assert A.plan_attention(1024, 1024, 80, batch_heads=16).block_m == 64  # 8 x 16 programs < 132 SMs
    assert A.plan_attention(1024, 1024, 80, batch_heads=128).block_m == 128
    p = A.plan_attention(256, 77, 160, batch_heads=16)
    assert (p.block_m, p.block_n, p.d0, p.d1, p.num_warps, p.num_stages) == (64, 64, 128, 32, 8, 2)
    p = A.plan_attention(20, 5, 24)
    assert (p.block_m, p.block_n, p.d0, p.d1) == (32, 16, 32, 0)
    assert str(A.plan_attention(4096, 77, 40, batch_heads=16)) == "m128_n64_d32+16_w8_s3"
    with pytest.raises(ValueError, match="nq must be an int >= 0"):
        A.plan_attention(-1, 4, 40)


@pytest.mark.parametrize(
    ("plan", "words"),
    [
        (A.AttentionPlan(48, 16, 32, 16, 4, 2), r"block_m must be a power of two in \[16, 256\]"),
        (A.AttentionPlan(16, 512, 32, 16, 4, 2), r"block_n must be a power of two"),
        (A.AttentionPlan(16, 16, 24, 16, 4, 2), "d0 must be a power of two >= 16"),
        (A.AttentionPlan(16, 16, 32, 8, 4, 2), "d1 0 or a power of two >= 16"),
        (A.AttentionPlan(16, 16, 32, 0, 4, 2), r"d0 \+ d1 must be >= D.*\(32, 16\)"),
        (A.AttentionPlan(16, 16, 64, 16, 4, 2), "a second chunk needs d0 < D"),
        (A.AttentionPlan(16, 16, 32, 16, 3, 2), "num_warps must be a power of two"),
        (A.AttentionPlan(16, 16, 32, 16, 4, 0), "num_stages must be an int >= 1"),
        (A.AttentionPlan(16, 16, 32, 16, 4, 2, exp_emu=3), "exp_emu must be 0, 2 or 4"),
        (A.AttentionPlan(16, 16, 32, 16, 4, 2, exp_emu=4), "exp_emu=4 needs block_n >= 32"),
        (A.AttentionPlan(16, 16, 32, 16, 4, 2, exp_deg=6), "exp_deg must be 3, 4 or 5"),
        (A.AttentionPlan(16, 16, 32, 16, 4, 2, lazy_rescale=13), r"lazy_rescale must be an int in \[0, 12\]"),
    ],
)
def test_bad_plans_are_refused(plan: A.AttentionPlan, words: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "_check_kernel_input", lambda q: None)  # reach the plan check on the CPU
    q, k, v = make_qkv(1, 1, 4, 4, 40, torch.float16)
    with pytest.raises(ValueError, match=words):
        A.flash_attention_triton(q, k, v, plan=plan)


def test_plan_names_show_the_exp_and_rescale_options() -> None:
    base = A.AttentionPlan(128, 64, 32, 16, 8, 3)
    assert str(base) == "m128_n64_d32+16_w8_s3" and base.exp_emu == 0 and base.lazy_rescale == 0
    assert str(A.AttentionPlan(128, 128, 32, 16, 8, 2, exp_emu=4, exp_deg=3)) == "m128_n128_d32+16_w8_s2_e4p3"
    assert str(A.AttentionPlan(128, 64, 32, 16, 8, 3, lazy_rescale=8)) == "m128_n64_d32+16_w8_s3_r8"
    assert A.plan_attention(4096, 4096, 40, batch_heads=16) == base  # the default is unchanged


# -- the software exp2 (float32 algorithm of _exp2_poly, mirrored in numpy) ---------------------------------
#: the relative-error bounds of the software exp2 per polynomial degree (minimax error + float32 rounding)
EXP2_BOUNDS = {3: 2.0**-13.2, 4: 2.0**-18.3, 5: 2.0**-22}


def exp2_poly_numpy(x: object, deg: int) -> object:
    """The float32 arithmetic of ``attention_kernel._exp2_poly``, step by step in numpy float32 (the
    interpreter check runs the Triton function itself on the same points)."""
    import numpy as np

    coeffs = {
        3: (0.05500893294811249, 0.24221095442771912, 0.6932829022407532, 1.0),
        4: (0.009582852944731712, 0.055906426161527634, 0.24024099111557007, 0.6931241750717163, 1.0),
        5: (0.001326472731307149, 0.009671512991189957, 0.05550733581185341, 0.24022242426872253,
            0.6931470036506653, 1.0),
    }[deg]  # fmt: skip
    f32 = np.float32
    x = np.maximum(np.asarray(x, dtype=f32), f32(-126.0))
    t = (x + f32(12582912.0)).astype(f32)
    f = (x - (t - f32(12582912.0)).astype(f32)).astype(f32)
    p = np.full_like(f, f32(coeffs[0]))
    for c in coeffs[1:]:
        p = (p * f + f32(c)).astype(f32)  # the GPU fuses these into FMAs: at most as much rounding
    bits = p.view(np.int32) + (t.view(np.int32) << np.int32(23))
    return bits.view(f32)


def exp2_test_points() -> object:
    import numpy as np

    dense = np.linspace(-126.0, 0.0, 1 << 20)
    special = np.concatenate([np.arange(-126, 1), np.arange(-125.5, 0, 1.0), [-1e-7, -0.5 - 2**-20, -0.0]])
    return np.concatenate([dense, special]).astype(np.float32)


@pytest.mark.parametrize("deg", [3, 4, 5])
def test_software_exp2_relative_error(deg: int) -> None:
    import numpy as np

    x = exp2_test_points()
    got = np.asarray(exp2_poly_numpy(x, deg), dtype=np.float64)
    truth = np.exp2(x.astype(np.float64))
    for i in (0, 1, len(x) // 3, len(x) - 1):  # np.exp2 in float64 is math.exp2
        assert truth[i] == math.exp2(float(x[i]))
    rel = np.abs(got / truth - 1.0)
    assert np.isfinite(got).all() and (got > 0).all()
    assert rel.max() < EXP2_BOUNDS[deg], f"degree {deg}: 2**{math.log2(rel.max()):.2f}"
    # below the range: clamped to 2**-126 (a normal float), never 0, inf or NaN
    low = np.asarray(exp2_poly_numpy(np.array([-127.0, -1e4, -np.inf], dtype=np.float32), deg))
    assert (low == np.float32(2.0**-126)).all()


# -- dispatch and errors -------------------------------------------------------------------------------------
def _refuse(*args: object, **kwargs: object) -> Tensor:
    raise AssertionError("the Triton path must not run here")


def test_auto_backend_uses_the_reference_where_the_kernel_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(A, "flash_attention_triton", _refuse)
    q, k, v = make_qkv(1, 2, 8, 77, 40, torch.float16)
    assert torch.equal(A.flash_attention(q, k, v), A.attention_reference(q, k, v))  # CPU
    assert torch.equal(A.flash_attention(q, k, v, backend="reference"), A.attention_reference(q, k, v))
    monkeypatch.setattr(A, "_use_triton", lambda *args: True)  # as for CUDA tensors
    for dtype, d in ((torch.float32, 40), (torch.float16, 44), (torch.bfloat16, 264), (torch.float16, 8)):
        q, k, v = make_qkv(1, 1, 4, 5, d, dtype)
        assert torch.equal(A.flash_attention(q, k, v), A.attention_reference(q, k, v)), (dtype, d)


def test_triton_backend_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = make_qkv(1, 2, 8, 8, 40, torch.float16)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        A.flash_attention(q, k, v, backend="triton")
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"takes float16, bfloat16, got torch\.float32"):
            A.flash_attention(q.float(), k.float(), v.float(), backend="triton")
        q44, k44, v44 = make_qkv(1, 1, 4, 4, 44, torch.float16)
        with pytest.raises(ValueError, match=r"multiples of 8 in \[16, 256\], got D=44"):
            A.flash_attention(q44, k44, v44, backend="triton")
        monkeypatch.setattr(A, "triton", None)
        with pytest.raises(RuntimeError, match="needs triton"):
            A.flash_attention(q, k, v, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this session runs the Triton interpreter")
    q, k, v = make_qkv(1, 2, 8, 8, 40, torch.float16)
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        A.flash_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda q: A.flash_attention(q[0], q, q), r"q must be a 4-D floating-point tensor \(B, H, Nq, D\)"),
        (lambda q: A.flash_attention(q, q.long(), q), r"k must be a 4-D floating-point .* \(B, H, Nk, D\)"),
        (lambda q: A.flash_attention(q, q, q[:, :, :3]), "k and v must have one shape"),
        (lambda q: A.flash_attention(q, q[:1], q[:1]), "must match q .* in batch, heads and head dim"),
        (lambda q: A.flash_attention(q, q[..., :8], q[..., :8]), "must match q"),
        (lambda q: A.flash_attention(q, q.half(), q.half()), "share one dtype"),
        (lambda q: A.flash_attention(q, q, q, scale=float("inf")), "finite float"),
        (lambda q: A.flash_attention(q, q, q, scale="0.1"), "finite float"),  # type: ignore[arg-type]
        (lambda q: A.flash_attention(q, q, q, backend="cuda"), "valid: auto, triton, reference"),  # type: ignore[arg-type]
        (lambda q: A.attention_reference(q, q, q[..., :8]), "k and v must have one shape"),
        (lambda q: A.flash_attention_triton(q, q, q, plan="m64"), "plan must be None or an AttentionPlan"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_argument_errors_say_what_is_valid(
    call: Callable[[Tensor], object], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(A, "_check_kernel_input", lambda q: None)  # the plan check runs on the CPU too
    with pytest.raises(ValueError, match=words):
        call(torch.randn(2, 3, 6, 16))


def test_unknown_backend_is_refused_by_the_shared_dispatch() -> None:
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid: auto, triton, reference"):
        A.flash_attention(q, q, q, backend="gpu")  # type: ignore[arg-type]


# -- the kernel in the Triton interpreter (CPU) --------------------------------------------------------------
def _fix_interpreter_bf16_dot() -> None:
    """The Triton interpreter (3.8) multiplies bfloat16 ``tl.dot`` operands as their raw uint16 storage;
    convert them to float32 first (exact) so the kernel's bf16 path can be checked on the CPU. On a GPU
    the tensor cores multiply bf16 properly (checked by the GPU tests)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def widen(t: interp.TensorHandle) -> interp.TensorHandle:
        if t.dtype.scalar != tl.bfloat16:
            return t
        return interp.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self: object, a: object, b: object, d: object, *rest: object) -> object:
        return original(self, widen(a), widen(b), d, *rest)

    interp.InterpreterBuilder.create_dot = create_dot  # type: ignore[method-assign]


def _plan(
    d: int, block_m: int = 16, block_n: int = 16, chunks: tuple[int, int] | None = None
) -> A.AttentionPlan:
    d0, d1 = chunks if chunks is not None else A.split_head_dim(d)
    return A.AttentionPlan(block_m, block_n, d0, d1, 4, 2)


def guarded_qkv(
    b: int, h: int, nq: int, nk: int, d: int, dtype: torch.dtype, *, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`make_qkv`'s fused-projection views, inside storage that is NaN past every edge (16 more
    tokens, 8 more lanes per token): a key or lane read outside the tensors makes the output NaN."""
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, seed=seed, layout="contiguous")
    hd = h * d

    def embed(parts: list[Tensor], n: int) -> list[Tensor]:
        big = torch.full((b, n + 16, len(parts) * hd + 8), float("nan"), dtype=dtype)
        out = []
        for i, t in enumerate(parts):
            view = big[:, :n, i * hd : (i + 1) * hd].unflatten(-1, (h, d)).transpose(1, 2)
            view.copy_(t)
            out.append(view)
        return out

    if nq == nk:
        return tuple(embed([q, k, v], nq))  # type: ignore[return-value]
    (qv,) = embed([q], nq)
    kv, vv = embed([k, v], nk)
    return qv, kv, vv


#: (block_m, block_n) of the benchmark's sweep (warps / stages do not change the interpreted program)
SWEEP_TILES = [(128, 64), (128, 128), (128, 32), (64, 64), (64, 128), (64, 32)]
#: SD-1.5 UNet attentions (Nq, Nk, D of the real call; Nq, Nk interpreted) whose default plans are run
UNET_DEFAULT_PLANS = [
    ((4096, 4096, 40), (300, 300)),
    ((4096, 77, 40), (130, 77)),
    ((1024, 1024, 80), (200, 200)),
    ((1024, 77, 80), (130, 77)),
    ((256, 256, 160), (256, 256)),
    ((256, 77, 160), (256, 77)),
    ((64, 64, 160), (64, 64)),
    ((64, 77, 160), (64, 77)),
]


if triton_available():
    import triton
    import triton.language as tl

    from ldm_sdk.accel.attention_kernel import _exp2_poly

    @triton.jit
    def _exp2_poly_kernel(x_ptr, y_ptr, n, DEG: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, _exp2_poly(x, DEG), mask=offs < n)


def ragged_plan_checks() -> list[str]:
    """The benchmark's non-default plans, the exp2 / rescale options and the UNet shapes' default plans on
    ragged key (and query) counts, with NaN-guarded inputs (no read past a tensor); fp16."""
    import numpy as np

    done: list[str] = []
    dt = torch.float16
    d0, d1 = A.split_head_dim(40)
    plans = [A.AttentionPlan(bm, bn, d0, d1, 4, 3) for bm, bn in SWEEP_TILES]
    plans += [
        A.AttentionPlan(128, 64, 64, 0, 8, 2),  # padded to one chunk
        A.AttentionPlan(128, 64, d0, d1, 8, 3, exp_emu=2),
        A.AttentionPlan(128, 128, d0, d1, 8, 2, exp_emu=4),
        A.AttentionPlan(128, 64, d0, d1, 8, 3, exp_emu=4, exp_deg=3, lazy_rescale=8),
        A.AttentionPlan(64, 32, d0, d1, 4, 3, lazy_rescale=1),
    ]
    for nq, nk in ((130, 77), (40, 13), (70, 200)):  # one full block + tail; fewer keys than a block; both
        q, k, v = guarded_qkv(1, 2, nq, nk, 40, dt, seed=nq + nk)
        for plan in plans:
            out = A.flash_attention_triton(q, k, v, plan=plan)
            assert_attention_close(out, q, k, v, None, f"({nq}, {nk}, 40) plan {plan}")
            done.append(f"ragged ({nq}, {nk}) {plan}")
    for (nq, nk, d), (iq, ik) in UNET_DEFAULT_PLANS:
        plan = A.plan_attention(nq, nk, d, batch_heads=16)
        q, k, v = guarded_qkv(1, 1, iq, ik, d, dt, seed=d + iq)
        out = A.flash_attention_triton(q, k, v, plan=plan)
        assert_attention_close(out, q, k, v, None, f"UNet ({nq}, {nk}, {d}) as ({iq}, {ik}) plan {plan}")
        done.append(f"UNet default plan ({nq}, {nk}, {d}) {plan}")
    # the lazy rescale where the maximum keeps growing (keys scaled up along the sequence) and scale 2
    q, k, v = guarded_qkv(1, 2, 40, 150, 40, dt, seed=3)
    k.mul_(torch.linspace(0.2, 3.0, 150).to(dt)[None, None, :, None])
    for plan in (A.AttentionPlan(16, 32, d0, d1, 4, 2, lazy_rescale=8), A.AttentionPlan(16, 32, d0, d1, 4, 2,
                 exp_emu=4, lazy_rescale=12)):  # fmt: skip
        out = A.flash_attention_triton(q, k, v, scale=2.0, plan=plan)
        assert_attention_close(out, q, k, v, 2.0, f"growing maximum, plan {plan}")
        done.append(f"lazy rescale, growing maximum {plan}")
    # the Triton software exp2 is the numpy mirror, bit for bit, and within its bound of exp2
    x = torch.from_numpy(exp2_test_points())
    for deg in (3, 4, 5):
        y = torch.empty_like(x)
        _exp2_poly_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), DEG=deg, BLOCK=4096)
        mirror = np.asarray(exp2_poly_numpy(x.numpy(), deg))
        assert np.array_equal(y.numpy().view(np.int32), mirror.view(np.int32)), f"exp2 degree {deg}"
        rel = (y.double() / torch.exp2(x.double()) - 1).abs().max()
        assert rel < EXP2_BOUNDS[deg], (deg, float(rel))
        done.append(f"software exp2 degree {deg}")
    return done


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    _fix_interpreter_bf16_dot()
    done: list[str] = []
    cases = [
        # (B, H, Nq, Nk, D), scale, layout, plan (None: the default rule)
        ((1, 2, 40, 77, 40), None, "fused", _plan(40, 16, 32)),  # cross-attention-like tail of 13 keys
        ((2, 1, 24, 24, 40), None, "fused", _plan(40, 16, 16)),  # fused QKV views, tail of 8
        ((1, 2, 33, 50, 80), None, "heads", _plan(80, 32, 16)),  # 33 queries: a block of 1 valid row
        ((1, 1, 20, 17, 160), None, "fused", _plan(160, 16, 16)),  # 128 + 32 chunks, tail of 1 key
        ((2, 1, 32, 64, 64), None, "contiguous", _plan(64, 16, 32)),  # one chunk, no ragged key block
        ((1, 1, 18, 5, 24), None, "heads", _plan(24, 16, 16)),  # one masked chunk; fewer keys than a block
        ((1, 2, 16, 16, 16), None, "fused", _plan(16, 16, 16)),  # the smallest head dim
        ((1, 2, 20, 77, 40), None, "fused", None),  # the default plan
        ((1, 2, 24, 77, 40), None, "fused", _plan(40, 16, 32, (64, 0))),  # padded to 64: one masked chunk
        ((1, 1, 17, 30, 40), 0.0, "heads", _plan(40, 16, 16)),  # scale 0: uniform weights
        ((1, 1, 17, 30, 80), -0.2, "heads", _plan(80, 16, 16)),  # negative scale
        ((1, 1, 17, 30, 40), 0.5, "contiguous", _plan(40, 16, 16)),  # sharper than 1 / sqrt(D)
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for dtype in HALF:
            for shape, scale, layout, plan in cases:
                q, k, v = make_qkv(*shape, dtype, layout=layout, seed=len(done))
                what = f"{shape} {str(dtype).removeprefix('torch.')} scale={scale} {layout} plan={plan}"
                out = A.flash_attention(q, k, v, scale=scale, backend="triton", plan=plan)
                assert_attention_close(out, q, k, v, scale, what)
                done.append(what)
            # unaligned strides (ALIGN 1): token stride 44, head stride 44 * 20
            base = torch.randn(1, 2, 20, 44, generator=torch.Generator().manual_seed(1)).to(dtype)
            q, k, v = base[..., :40], base[..., 2:42].flip(2), base[..., 4:44]
            out = A.flash_attention_triton(q, k, v, plan=_plan(40, 16, 16))
            assert_attention_close(out, q, k, v, None, f"unaligned strides {dtype}")
            done.append(f"unaligned strides {dtype}")
            # a strided head dim: copied to unit stride first
            qt = torch.randn(1, 2, 40, 24).to(dtype).transpose(-1, -2)
            out = A.flash_attention_triton(qt, qt, qt, plan=_plan(40, 16, 16))
            assert_attention_close(out, qt, qt, qt, None, f"strided head dim {dtype}")
            done.append(f"strided head dim {dtype}")
        # the split and the padded plan agree to float32 rounding, and with the reference to the bound
        q, k, v = make_qkv(1, 2, 24, 77, 40, torch.float16, seed=7)
        split = A.flash_attention_triton(q, k, v, plan=_plan(40, 16, 32))
        padded = A.flash_attention_triton(q, k, v, plan=_plan(40, 16, 32, (64, 0)))
        assert ((split.double() - padded.double()).abs() <= output_ulp(split, split.dtype)).all()
        done.append("split vs padded plan")
        # empty sizes
        assert torch.equal(A.flash_attention_triton(q, k[:, :, :0], v[:, :, :0]), torch.zeros_like(q))
        assert A.flash_attention_triton(q[:, :, :0], k, v).shape == (1, 2, 0, 40)
        done.append("empty sizes")
        # recorded, not launched: the output stays unwritten (NaN), one launch with the plan's options
        recorder = KernelRecorder()
        plan = _plan(40, 16, 32)
        out = A.flash_attention(q, k, v, backend="triton", recorder=recorder, plan=plan)
        assert len(recorder) == 1 and torch.isnan(out).all()
        rec = recorder.launches[0]
        assert rec.grid == (math.ceil(24 / 16), 2, 1)
        assert rec.kwargs["num_stages"] == 2 and rec.kwargs["D0"] == 32 and rec.kwargs["HAS_SECOND"]
        done.append("recorded launch")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_attention_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 2 * (12 + 2) + 3, done


# -- GPU -----------------------------------------------------------------------------------------------------
#: (B, H, Nq, Nk, D): SD-1.5 at 512 px with guidance -- self-attention per level, and cross-attention
SD15_SHAPES = [
    (2, 8, 4096, 4096, 40),
    (2, 8, 4096, 77, 40),
    (2, 8, 1024, 1024, 80),
    (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160),
    (2, 8, 256, 77, 160),
    (2, 8, 64, 64, 160),
    (2, 8, 64, 77, 160),
]


def _skip_without_bf16(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")


@pytest.mark.gpu
class TestKernelOnCuda:
    """The kernel at the SD-1.5 shapes against fp32 SDPA (math backend), on views of fused projections,
    with the bound of the module doc (plus float32 noise of the fp32 reference), and in a CUDA graph."""

    @pytest.mark.parametrize("dtype", HALF, ids=str)
    def test_sd15_shapes_against_fp32_sdpa(self, dtype: torch.dtype) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        _skip_without_bf16(dtype)
        failures = []
        with torch.no_grad():
            for shape in SD15_SHAPES:
                q, k, v = make_qkv(*shape, dtype, device="cuda", seed=shape[2])
                out = A.flash_attention(q, k, v)  # auto: the kernel
                with sdpa_kernel(SDPBackend.MATH):
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                    mag = F.scaled_dot_product_attention(q.float(), k.float(), v.float().abs())
                if not out.transpose(1, 2).is_contiguous():
                    failures.append(f"{shape}: output strides {out.stride()}")
                worst, ratio = attention_error(out, ref, mag + 2**-19 * mag.max(), torch.finfo(dtype).eps)
                if not worst <= 1.0:
                    failures.append(f"{shape} {dtype}: {worst:.3g} x the bound")
                rel = float((out.float() - ref).abs().max() / ref.abs().max())
                print(f"{shape} {dtype}: {worst:.3f} x bound, max rel err {rel:.2e}, mean {ratio.mean():.3f}")
        assert not failures, "\n".join(failures)

    def test_replays_in_a_cuda_graph(self) -> None:
        q, k, v = make_qkv(2, 8, 1024, 1024, 80, torch.float16, device="cuda")
        with torch.no_grad():
            eager = A.flash_attention(q, k, v)  # compiles
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                A.flash_attention(q, k, v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = A.flash_attention(q, k, v)
            v.mul_(-1)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static, A.flash_attention(q, k, v))
            assert torch.equal(static, -eager)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_ragged_plans_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--ragged-plan-checks")
    assert len(done) == 3 * 11 + len(UNET_DEFAULT_PLANS) + 2 + 3, done


if __name__ == "__main__" and ("--interpreter-checks" in sys.argv or "--ragged-plan-checks" in sys.argv):
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    with unwritten_memory_is_nan(), torch.no_grad():
        checks = ragged_plan_checks if "--ragged-plan-checks" in sys.argv else interpreter_checks
        print(json.dumps(checks()))
