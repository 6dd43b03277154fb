"""The one-tile attention over short key sequences (``ldm_sdk.accel.short_attention``) and its use by
``FusedCrossAttention``.

* CPU: dispatch (``auto`` / ``reference`` run ``F.scaled_dot_product_attention`` off CUDA, the same bits as
  ``CrossAttention.attention``), argument errors that say what is valid;
* the kernel through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, so
  :func:`test_kernel_in_the_interpreter` runs this file as a script in a subprocess): head dims 40 / 80 /
  160 and odd ones, 77 / 64 / 3 keys, query counts that are no multiple of the tile, K / V as strided
  ``split`` views of one projection, fp16 (the interpreter's bf16 products are wrong: bf16 is checked on
  the GPU) -- within one output ulp of a torch emulation of the
  stated numerics (float32 scores, probabilities rounded for the product with ``v``, the float32 sum
  divided out at the end) and within half-precision error of a float64 attention;
* GPU (mark ``gpu``): the SD-1.5 cross-attention shapes against float64 and cuDNN's SDPA, eager and under
  graph replay.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import short_attention as A
from ldm_sdk.accel.triton_kernels import compare_ulps, triton_available
from ldm_sdk.models.attention import CrossAttention, multi_head_attention
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan


def projections(
    b: int, n: int, m: int, heads: int, d: int, dtype: torch.dtype, seed: int, device: str = "cpu"
) -> tuple[Tensor, Tensor, Tensor]:
    """q ``(B, N, H D)`` and k, v as the two halves of one ``(B, M, 2 H D)`` projection (strided views)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads * d, generator=g).to(dtype).to(device)
    kv = torch.randn(b, m, 2 * heads * d, generator=g).to(dtype).to(device)
    k, v = kv.split(heads * d, dim=-1)
    return q, k, v


def truth(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """Float64 softmax attention of the (rounded) inputs, heads merged."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.double().reshape(b, -1, heads, d).transpose(1, 2)
    p = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return (p @ vh).transpose(1, 2).reshape(b, n, inner)


def emulated(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float) -> Tensor:
    """The kernel's numerics in torch: float32 scores and exp, probabilities rounded to the input dtype for
    the product with v (float32 accumulation), the float32 row sum divided out, rounded once."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.float().view(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.float().reshape(b, -1, heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    out = (p.to(q.dtype).float() @ vh) / p.sum(dim=-1, keepdim=True)
    return out.transpose(1, 2).reshape(b, n, inner).to(q.dtype)


def test_off_cuda_the_reference_runs_as_cross_attention_does() -> None:
    attn = CrossAttention(query_dim=64, context_dim=32, heads=4, dim_head=16).eval()
    q, k, v = projections(2, 37, 77, 4, 16, torch.float32, 0)
    for backend in ("auto", "reference"):
        out = A.short_attention(q, k, v, 4, attn.scale, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(out, attn.attention(q, k, v)), backend
    assert A.fits_kernel(q.half(), k.half(), v.half(), 4) and not A.fits_kernel(q, k, v, 4)  # fp32: SDPA
    wide = projections(1, 8, 1, 1, 320, torch.float16, 0)  # one 320-wide head (LDM cin256): the library's
    assert not A.fits_kernel(*wide, 1)


def test_errors_say_what_is_valid() -> None:
    q, k, v = projections(1, 8, 5, 2, 16, torch.float16, 0)
    with pytest.raises(ValueError, match="one shape"):
        A.short_attention(q, k, v[:, :3], 2, 0.25)
    with pytest.raises(ValueError, match="agree in batch and features"):
        A.short_attention(q[:, :, :16], k, v, 2, 0.25)
    with pytest.raises(ValueError, match="heads must divide"):
        A.short_attention(q, k, v, 3, 0.25)
    with pytest.raises(ValueError, match="unknown backend"):
        A.short_attention(q, k, v, 2, 0.25, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16 / bf16"):
        A.short_attention_triton(q.float(), k.float(), v.float(), 2, 0.25)
    if triton_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs CUDA tensors"):
            A.short_attention_triton(q, k, v, 2, 0.25)


def check(
    q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, out: Tensor, emulation: bool = True
) -> str:
    """Within half-precision error of float64 and (``emulation``: the interpreter, whose ``exp`` is
    numpy's) within one output ulp of the emulation, float32 summation order aside; returns the report.
    On a GPU ``exp`` is the hardware approximation: a probability may round to the other neighbour, and an
    output that cancels to near zero then differs by many of its own ulps, so there the comparison is with
    float64 and with cuDNN's error."""
    if emulation:
        report = compare_ulps(out, emulated(q, k, v, heads, scale).double())
        assert report.ok(), f"against the emulation: {report}"
    ref = truth(q, k, v, heads, scale)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    limit = 4e-3 if q.dtype == torch.float16 else 3e-2
    assert err < limit, f"relative error {err:.2e} against float64 (limit {limit})"
    return f"err {err:.1e}"


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    cases = [
        # batch, queries, keys, heads, head dim, dtype
        (2, 70, 77, 2, 40, torch.float16),  # SD-1.5 64 x 64 heads, two query tiles (one partial)
        (1, 64, 77, 2, 80, torch.float16),
        (1, 16, 77, 1, 160, torch.float16),
        (2, 64, 64, 2, 40, torch.float16),  # the 8 x 8 self-attention: keys a power of two
        (1, 9, 3, 3, 24, torch.float16),  # few keys, odd head dim
        (1, 20, 100, 1, 32, torch.float16),  # two key blocks of 64
    ]
    with unwritten_memory_is_nan():
        for b, n, m, heads, d, dtype in cases:
            q, k, v = projections(b, n, m, heads, d, dtype, seed=len(done))
            scale = d**-0.5
            out = A.short_attention_triton(q, k, v, heads, scale)
            assert out.shape == q.shape and out.is_contiguous()
            done.append(f"{(b, n, m, heads, d)} {dtype}: {check(q, k, v, heads, scale, out)}")
        # large logits: the row maximum is subtracted before exp
        q, k, v = projections(1, 8, 77, 1, 40, torch.float16, seed=9)
        out = A.short_attention_triton(q * 8, k * 8, v, 1, 0.5)
        assert torch.isfinite(out).all()
        check(q * 8, k * 8, v, 1, 0.5, out)
        done.append("sharp softmax")
        with pytest.raises(ValueError, match=f"at most {A.MAX_HEAD_DIM} features"):
            A.short_attention_triton(*projections(1, 4, 5, 1, 320, torch.float16, 0), 1, 0.25)
        with pytest.raises(ValueError, match=f"1 to {A.MAX_KEYS}"):
            A.short_attention_triton(*projections(1, 4, A.MAX_KEYS + 1, 1, 16, torch.float16, 0), 1, 0.25)
        done.append("errors")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 8, done


def test_the_kernel_is_taken_where_it_measured_faster() -> None:
    def q(batch: int, rows: int, d: int) -> Tensor:
        return torch.empty(batch, rows, 8 * d, dtype=torch.float16)

    assert A.kernel_pays(q(16, 4096, 40), 8)  # head dim 40: everywhere
    assert A.kernel_pays(q(2, 1024, 80), 8) and not A.kernel_pays(q(16, 1024, 80), 8)
    assert A.kernel_pays(q(16, 64, 160), 8) and not A.kernel_pays(q(16, 256, 160), 8)


def test_key_blocks_cover_the_keys_with_little_padding() -> None:
    assert A.key_blocks(77) == (64, 16)  # a prompt: 80 keys formed, not 128
    assert A.key_blocks(64) == (64, 0) and A.key_blocks(5) == (16, 0) and A.key_blocks(100) == (64, 64)
    for keys in range(1, A.MAX_KEYS + 1):
        first, rest = A.key_blocks(keys)
        assert first + rest >= keys and first >= 16 and (rest == 0 or rest >= 16), keys


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd15_shapes_on_cuda(dtype: torch.dtype) -> None:
    """The SD-1.5 cross-attentions at batch 2 (64 / 32 / 16 / 8 px maps) and the 8 x 8 self-attention:
    as accurate as cuDNN's SDPA against float64, eager and replayed from a graph."""
    for n, m, d in ((4096, 77, 40), (1024, 77, 80), (256, 77, 160), (64, 77, 160), (64, 64, 160)):
        q, k, v = projections(2, n, m, 8, d, dtype, seed=n + m, device="cuda")
        scale = d**-0.5
        out = A.short_attention(q, k, v, 8, scale)
        check(q, k, v, 8, scale, out, emulation=False)
        ref = truth(q, k, v, 8, scale)
        sdpa = multi_head_attention(q, k, v, 8, scale)
        ours = (out.double() - ref).abs().max().item()
        theirs = (sdpa.double() - ref).abs().max().item()
        assert ours <= 1.5 * theirs + 1e-6, (n, m, d, ours, theirs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = A.short_attention(q, k, v, 8, scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, out)  # the same kernel on the same inputs
        q.mul_(-0.5)  # new queries: the replay reads them
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, A.short_attention(q, k, v, 8, scale)) and not torch.equal(static, out)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
