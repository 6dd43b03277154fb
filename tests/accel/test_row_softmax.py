"""The in-place row softmax kernel (``ldm_sdk.accel.row_softmax``).

* CPU: dispatch (``auto`` / ``reference`` take ``torch.softmax`` off CUDA and return a new tensor), argument
  errors that say what is valid;
* the kernel through the Triton interpreter (``TRITON_INTERPRET=1`` must be set before Triton is imported,
  so :func:`test_kernel_in_the_interpreter` runs this file as a script in a subprocess): fp16 / bf16 / fp32,
  rows of a power of two and not, one and many rows, large and very negative logits, within one output ulp
  of a float64 softmax and written in place;
* GPU (mark ``gpu``): the kl-f8 decoder's 4096 x 4096 fp16 scores against float64, and under graph replay.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import row_softmax as S
from ldm_sdk.accel.triton_kernels import compare_ulps, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan


def logits(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0, seed: int = 0) -> Tensor:
    x = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(dtype)


def truth(x: Tensor) -> Tensor:
    """The float64 softmax of the (rounded) input."""
    return torch.softmax(x.double(), dim=-1)


def accurate(out: Tensor, ref: Tensor) -> tuple[bool, str]:
    """fp16 / bf16: within one output ulp (a few elements over it by float32 noise); float32 outputs are
    float32 evaluations themselves: within one ulp plus the float32 noise allowance."""
    report = compare_ulps(out, ref)
    return (report.within_bound if out.dtype == torch.float32 else report.ok()), str(report)


def test_reference_paths_return_torch_softmax() -> None:
    x = logits((3, 5, 37), torch.float32)
    for backend in ("auto", "reference"):
        out = S.softmax_(x.clone(), backend=backend)
        assert torch.equal(out, torch.softmax(x, dim=-1)), backend
    strided = logits((6, 40), torch.float32).t()  # not contiguous: auto takes torch's softmax
    assert torch.equal(S.softmax_(strided), torch.softmax(strided, dim=-1))


def test_errors_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        S.softmax_(torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown backend"):
        S.softmax_(torch.zeros(2, 3), backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes float16, bfloat16, float32"):
        S.softmax_triton_(torch.zeros(2, 3, dtype=torch.float64))
    if triton_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs CUDA tensors"):
            S.softmax_triton_(torch.zeros(2, 3))


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked."""
    done: list[str] = []
    cases = [
        # shape, dtype, logit scale
        ((4, 64), torch.float16, 3.0),  # a power of two
        ((3, 37), torch.bfloat16, 3.0),  # padded row
        ((2, 3, 100), torch.float32, 10.0),  # 3-D, sharp
        ((1, 5), torch.float16, 0.0),  # uniform row
        ((5, 1), torch.float32, 3.0),  # one column: all ones
        ((2, 300), torch.float16, 1000.0),  # logits near the fp16 range: the max is subtracted first
    ]
    with unwritten_memory_is_nan():
        for shape, dtype, scale in cases:
            x = logits(shape, dtype, scale, seed=len(done))
            ref = truth(x)
            buf = x.clone()
            out = S.softmax_triton_(buf)
            assert out.data_ptr() == buf.data_ptr(), "not in place"
            ok, report = accurate(out, ref)
            assert ok, f"{shape} {dtype} x{scale}: {report}"
            done.append(f"{shape} {dtype} x{scale}")
        x = torch.full((2, 8), -1e4, dtype=torch.float16)
        x[:, 3] = 0.0  # one finite winner per row, the rest underflow to 0
        out = S.softmax_triton_(x.clone())
        assert torch.equal(out, torch.softmax(x.float(), -1).half()), out
        done.append("underflowing row")
        assert S.softmax_triton_(torch.empty(0, 4)).shape == (0, 4)
        with pytest.raises(ValueError, match="contiguous"):
            S.softmax_triton_(torch.zeros(6, 4).t())
        with pytest.raises(ValueError, match=f"at most {S.MAX_ROW}"):
            S.softmax_triton_(torch.zeros(1, S.MAX_ROW + 1))
        done.append("errors")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 8, done


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_decoder_scores_on_cuda(dtype: torch.dtype) -> None:
    """The kl-f8 mid block's 4096 x 4096 scores (logits of a few units), eager and replayed from a graph."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    x = logits((1, 4096, 4096), dtype, 3.0).cuda()
    out = S.softmax_(x.clone())
    ok, report = accurate(out, truth(x))
    assert ok, report
    static = x.clone()
    S.softmax_(static.clone())  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        S.softmax_(static)
    static.copy_(x)
    graph.replay()
    assert torch.equal(static, out)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
