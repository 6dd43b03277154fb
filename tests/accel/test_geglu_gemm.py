"""The GEGLU dual GEMM of ``ldm_sdk.accel.geglu_gemm`` (projection + ``a * gelu(gate)`` in one kernel).

CPU (always):

* the float32 reference against an independent float64 computation (``F.linear`` + ``chunk`` + ``F.gelu``),
  fp32 / bf16 / fp16, 2-D and batched ``(B, N, C)`` inputs, with and without bias; bit-identical to eager
  float32 ``GEGLU``; differentiable;
* the launch plan (SD-1.5 shapes, clamping to small problems, validation);
* dispatch (``auto`` falls back off CUDA, under autograd and where the kernel cannot run: fp32, a weight in
  another dtype, ``C`` or ``inner`` not a multiple of 8) and argument errors;
* the Triton kernel itself through the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before Triton
  is imported, so :func:`test_geglu_gemm_in_the_interpreter` runs this file as a script in a subprocess
  (:func:`interpreter_checks`), with fresh buffers NaN-filled so an unwritten output fails. fp16 and bf16
  outputs against the float64 truth (:func:`assert_near_truth`): M, inner and C not multiples of the tiles,
  several K steps, no bias, batched and row-strided inputs, the default plan, the recorder.

GPU (mark ``gpu``): the kernel against the float32 reference and the float64 truth at the SD-1.5
feed-forward shapes, fp16 / bf16, and replay under a CUDA graph.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel import geglu_gemm as G
from ldm_sdk.accel.triton_kernels import KernelRecorder, compare_ulps, output_ulp, triton_available
from ldm_sdk.models.attention import GEGLU
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

HALF = [torch.float16, torch.bfloat16]


# -- float64 truth -------------------------------------------------------------------------------------------
def geglu_linear_truth(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``a * gelu(gate)`` of ``F.linear`` in float64, written out independently of the module."""
    h = F.linear(x.double(), weight.double(), bias.double() if bias is not None else None)
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def make_inputs(
    lead: tuple[int, ...],
    channels: int,
    inner: int,
    dtype: torch.dtype,
    *,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Activations ``(*lead, C)``, ``nn.Linear``-scaled weight ``(2 inner, C)`` and bias ``(2 inner,)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, channels, generator=g).to(device, dtype)
    w = (torch.randn(2 * inner, channels, generator=g) / channels**0.5).to(device, dtype)
    b = (0.5 * torch.randn(2 * inner, generator=g)).to(device, dtype)
    return x, w, b


def assert_near_truth(out: Tensor, truth: Tensor, what: str, *, max_ulps: float = 2.0) -> None:
    """fp32: within float32 rounding of the float64 truth. fp16 / bf16: every element within one output ulp
    plus the float32 noise allowance (:func:`compare_ulps`), and within ``max_ulps`` output ulps wherever
    the output is not tiny (>= 2**-10 of the largest): near zero, ``gelu``'s ``1 + erf`` cancels in float32
    (torch's float32 gelu does the same), which the allowance covers in absolute terms but which can be
    several ulps of such a tiny value."""
    assert out.shape == truth.shape and out.is_contiguous(), f"{what}: shape {tuple(out.shape)}"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), truth, rtol=2e-6, atol=2e-6 * float(truth.abs().max()))
        return
    report = compare_ulps(out, truth)
    assert report.within_bound, f"{what}: {report}"
    big = truth.abs() >= truth.abs().max() * 2.0**-10
    ulps = (out.double() - truth).abs() / output_ulp(truth, out.dtype)
    worst = float(ulps[big].max()) if big.any() else 0.0
    assert worst <= max_ulps, f"{what}: {worst:.3g} ulp away where the output is not tiny ({report})"


# -- reference -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("lead", [(13,), (3, 5), (2, 3, 4)], ids=["2d", "batched", "4d"])
def test_reference_matches_float64(dtype: torch.dtype, has_bias: bool, lead: tuple[int, ...]) -> None:
    x, w, b = make_inputs(lead, 40, 24, dtype, seed=len(lead))
    bias = b if has_bias else None
    out = G.geglu_linear_reference(x, w, bias)
    assert out.dtype == dtype and out.shape == (*lead, 24)
    assert_near_truth(out, geglu_linear_truth(x, w, bias), f"reference {lead} {dtype} bias={has_bias}")


def test_reference_is_eager_geglu_in_float32() -> None:
    """Why a model using the fused op equals the unfused one bit for bit on the CPU in float32."""
    geglu = GEGLU(32, 48)
    tokens = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(
            G.geglu_linear_reference(tokens, geglu.proj.weight, geglu.proj.bias), geglu(tokens)
        )
        assert torch.equal(G.geglu_linear(tokens, geglu.proj.weight, geglu.proj.bias), geglu(tokens))


def test_reference_is_differentiable() -> None:
    x, w, b = (t.double().requires_grad_(True) for t in make_inputs((2, 5), 16, 8, torch.float32))
    G.geglu_linear(x, w, b).square().sum().backward()  # auto: the reference under autograd
    grads = [t.grad for t in (x, w, b)]
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    geglu_linear_truth(x2, w2, b2).square().sum().backward()
    for got, want in zip(grads, (x2.grad, w2.grad, b2.grad), strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want)


def test_empty_inputs() -> None:
    x, w, b = make_inputs((0, 3), 16, 8, torch.float16)
    assert G.geglu_linear(x, w, b).shape == (0, 3, 8)
    assert G.geglu_linear_reference(x, w, None).shape == (0, 3, 8)


# -- launch plan ---------------------------------------------------------------------------------------------
SD15_FF = [(320, 1280, 4096), (640, 2560, 1024), (1280, 5120, 256), (1280, 5120, 64)]  # C, inner, tokens


@pytest.mark.parametrize("batch", [2, 16])
def test_plan_for_sd15_shapes(batch: int) -> None:
    for channels, inner, tokens in SD15_FF:
        m = batch * tokens
        plan = G.plan_geglu_gemm(m, inner, channels)
        assert plan == G.plan_geglu_gemm(m, inner, channels)  # deterministic
        assert (plan.block_m, plan.block_n) in {(bm, bn) for bm, bn, *_ in G.TILE_SHAPES}
        assert plan.block_k == 64 and channels % plan.block_k == 0 and inner % plan.block_n == 0
        assert plan.num_warps == 4 and 3 <= plan.num_stages <= 4
        assert plan.programs(m, inner) >= 40
    # where the kernel is used (C = 320) the measured best plan: 128 x 64, 4 warps, 3 stages
    for m in (2 * 4096, 16 * 4096):
        plan = G.plan_geglu_gemm(m, 1280, 320)
        assert (plan.block_m, plan.block_n, plan.num_warps, plan.num_stages) == (128, 64, 4, 3)


def test_plan_clamps_tiles_to_small_problems() -> None:
    plan = G.plan_geglu_gemm(5, 8, 8)
    assert (plan.block_m, plan.block_n, plan.block_k) == (16, 16, 16)
    plan = G.plan_geglu_gemm(40, 24, 40)
    assert plan.block_m <= 64 and plan.block_n <= 32 and plan.block_k == 64
    assert G.plan_geglu_gemm(0, 8, 8).programs(0, 8) == 0


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: G.GegluGemmPlan(48, 64, 64, 4, 3), "block_m must be a power of two >= 16"),
        (lambda: G.GegluGemmPlan(64, 8, 64, 4, 3), "block_n must be a power of two >= 16"),
        (lambda: G.GegluGemmPlan(64, 64, 64, 3, 3), "num_warps must be one of"),
        (lambda: G.GegluGemmPlan(64, 64, 64, 4, 0), "num_stages must be an int >= 1"),
        (lambda: G.GegluGemmPlan(64, 64, 64, 4, 3, group_m=0), "group_m must be an int >= 1"),
        (lambda: G.plan_geglu_gemm(-1, 8, 8), "m must be an int >= 0"),
        (lambda: G.plan_geglu_gemm(8, 8, 8, sms=0), "sms must be an int >= 1"),
    ],
)  # fmt: skip
def test_plan_errors_say_what_is_valid(make: Callable[[], object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make()


# -- dispatch and errors -------------------------------------------------------------------------------------
def _refuse(*args: object, **kwargs: object) -> Tensor:
    raise AssertionError("the Triton path must not run here")


def test_auto_backend_uses_the_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(G, "geglu_linear_triton", _refuse)
    x, w, b = make_inputs((2, 7), 32, 16, torch.float16)
    want = G.geglu_linear_reference(x, w, b)
    assert torch.equal(G.geglu_linear(x, w, b), want)
    assert torch.equal(G.geglu_linear(x, w, b, backend="reference"), want)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("float32", "takes float16, bfloat16 inputs, got float32"),
        ("weight_dtype", "needs the weight in x's dtype"),
        ("channels", "multiples of 8, got C=36, inner=16"),
        ("inner", "multiples of 8, got C=32, inner=12"),
    ],
)
def test_auto_falls_back_where_the_kernel_cannot_run(
    monkeypatch: pytest.MonkeyPatch, case: str, words: str
) -> None:
    """With the kernel otherwise eligible (as for CUDA tensors), inputs it cannot take use the reference
    under ``auto`` and are refused, with the reason, under ``triton``."""
    monkeypatch.setattr(G, "_use_triton", lambda *args: True)
    channels = 36 if case == "channels" else 32
    inner = 12 if case == "inner" else 16
    x, w, b = make_inputs((2, 5), channels, inner, torch.float16)
    if case == "float32":
        x, w, b = x.float(), w.float(), b.float()
    elif case == "weight_dtype":
        w = w.bfloat16()
    with monkeypatch.context() as m:
        m.setattr(G, "geglu_linear_triton", _refuse)
        assert torch.equal(G.geglu_linear(x, w, b), G.geglu_linear_reference(x, w, b))
    with pytest.raises(ValueError, match=words):
        G.geglu_linear(x, w, b, backend="triton")


def test_autograd_falls_back_or_is_refused() -> None:
    x, w, b = make_inputs((2, 5), 16, 8, torch.float16)
    w.requires_grad_(True)
    G.geglu_linear(x, w, b).float().sum().backward()  # auto: the differentiable reference
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(RuntimeError, match="no backward"):
        G.geglu_linear(x, w, b, backend="triton")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this session runs the Triton interpreter")
    x, w, b = make_inputs((2, 5), 16, 8, torch.float16)
    with torch.no_grad(), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        G.geglu_linear(x, w, b, backend="triton")


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda x, w, b: G.geglu_linear(x.long(), w, b), r"x must be a floating-point tensor \(\.\.\., C\)"),
        (lambda x, w, b: G.geglu_linear(x, w[:, :8], b), r"weight must be a floating-point \(2 \* inner, C"),
        (lambda x, w, b: G.geglu_linear(x, w[:-1], b), "even number of rows"),
        (lambda x, w, b: G.geglu_linear(x, w[None], b), "got a float32 tensor of shape"),
        (lambda x, w, b: G.geglu_linear(x, w, b[:-2]), "bias must be None or a 1-D .* 32 values"),
        (lambda x, w, b: G.geglu_linear(x, w, b.long()), "bias must be None or a 1-D floating-point"),
        (lambda x, w, b: G.geglu_linear(x, w, b, backend="cuda"), "valid: auto, triton, reference"),  # type: ignore[arg-type]
        (lambda x, w, b: G.geglu_linear_reference(x, w.t(), b), "C = 16"),
        (lambda x, w, b: G.geglu_linear_triton(x.half(), w.half(), b, plan=(64, 64)), "GegluGemmPlan"),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_argument_errors_say_what_is_valid(
    call: Callable[[Tensor, Tensor, Tensor], object], words: str
) -> None:
    x, w, b = make_inputs((2, 3), 16, 16, torch.float32)
    with pytest.raises(ValueError, match=words):
        call(x, w, b)


# -- the kernel in the Triton interpreter (CPU) --------------------------------------------------------------
def _check_kernel(
    x: Tensor, w: Tensor, b: Tensor | None, what: str, plan: G.GegluGemmPlan | None = None
) -> None:
    out = G.geglu_linear_triton(x, w, b, plan=plan)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0] // 2), what
    assert_near_truth(out, geglu_linear_truth(x, w, b), what)


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    tiny = G.GegluGemmPlan(16, 16, 16, num_warps=4, num_stages=2, group_m=2)
    cases = [
        # lead dims, C, inner, bias, plan
        ((37,), 48, 40, True, tiny),  # M, inner, C all ragged against 16 x 16 x 16: 3 x 3 tiles, 3 K steps
        ((2, 19), 40, 24, True, tiny),  # batched; C = 40: K tail of 8 (masked), inner tail of 8
        ((33,), 72, 24, False, G.GegluGemmPlan(32, 16, 32, 4, 2, group_m=2)),  # no bias, K tail, group tail
        ((3, 7), 64, 64, True, None),  # the default plan, clamped to 32 x 64 x 64 (one K step, EVEN_K)
        ((2, 9), 96, 32, True, G.GegluGemmPlan(16, 32, 32, 4, 3)),  # EVEN_K with three K steps
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for dtype in HALF:
            for lead, channels, inner, has_bias, plan in cases:
                x, w, b = make_inputs(lead, channels, inner, dtype, seed=len(done))
                what = f"{lead} C={channels} inner={inner} bias={has_bias} {plan and plan.label()} {dtype}"
                _check_kernel(x, w, b if has_bias else None, what, plan)
                done.append(what)
        # SD-1.5's first level at text length: default plan, 10 column tiles, 5 K steps
        x, w, b = make_inputs((1, 77), 320, 1280, torch.float16, seed=7)
        _check_kernel(x, w, b, "SD-1.5 level-1 shape, 77 tokens")
        done.append("SD-1.5 level-1 shape")
        # a row-strided view (every other token) is read in place; a bias in float32
        x, w, b = make_inputs((2, 10), 32, 16, torch.bfloat16, seed=8)
        strided = x[:, ::2]
        assert strided.reshape(-1, 32).stride() == (64, 1)  # a view with row stride 64, no copy
        _check_kernel(strided, w, b.float(), "strided x, float32 bias", tiny)
        done.append("strided x, float32 bias")
        # through the dispatcher with backend="triton"
        x, w, b = make_inputs((4, 5), 16, 8, torch.float16, seed=9)
        assert_near_truth(G.geglu_linear(x, w, b, backend="triton"), geglu_linear_truth(x, w, b), "dispatch")
        done.append("geglu_linear(backend='triton')")
        # the recorder: one launch recorded with the plan's constexprs, the output left unwritten
        recorder = KernelRecorder()
        out = G.geglu_linear_triton(x, w, b, recorder=recorder)
        assert len(recorder) == 1 and torch.isnan(out).all()
        plan = G.plan_geglu_gemm(20, 8, 16)
        rec = recorder.launches[0]
        assert rec.kwargs["BLOCK_M"] == plan.block_m and rec.kwargs["num_stages"] == plan.num_stages
        assert rec.grid == (plan.programs(20, 8),)
        done.append("recorder")
        assert G.geglu_linear_triton(torch.empty(0, 16, dtype=torch.float16), w, b).shape == (0, 8)
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_geglu_gemm_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 14, done


# -- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_kernel_on_sd15_shapes_and_in_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 / bf16 at the SD-1.5 feed-forward shapes (batch 2) against the float32 reference (TF32 off) and
    the float64 truth; then captured in a CUDA graph and replayed on new inputs."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    failures = []
    with torch.no_grad():
        for dtype in HALF:
            if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
                continue
            for channels, inner, tokens in SD15_FF:
                x, w, b = make_inputs((2, tokens), channels, inner, dtype, device="cuda", seed=channels)
                out = G.geglu_linear(x, w, b)  # auto: the kernel
                for name, ref in (
                    ("float32 reference", G.geglu_linear_reference(x, w, b)),
                    ("float64 truth", geglu_linear_truth(x, w, b)),
                ):
                    try:
                        assert_near_truth(out, ref, f"{(2, tokens, channels)} -> {inner} {dtype} vs {name}")
                    except AssertionError as exc:
                        failures.append(str(exc))
        assert not failures, "\n".join(failures)
        assert_replays_in_a_graph(G.geglu_linear)


def assert_replays_in_a_graph(call: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """``call(x, w, b)`` at the SD-1.5 second-level shape, captured in a CUDA graph: a replay after ``x``
    changed in place gives what an eager call on the new ``x`` gives (and not the old result)."""
    x, w, b = make_inputs((2, 1024), 640, 2560, torch.float16, device="cuda")
    eager = call(x, w, b)  # compiles
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(x, w, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call(x, w, b)
    x.mul_(-0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, call(x, w, b))
    assert not torch.equal(static, eager)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
