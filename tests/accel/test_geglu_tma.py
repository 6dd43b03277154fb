"""The TMA form of the GEGLU dual GEMM (``ldm_sdk.accel.geglu_tma``).

CPU (always): the plan rule and its validation; where the kernel runs (not on the CPU under ``"auto"``,
Hopper only); how far ``geglu_linear_pays`` reaches with it; the Triton kernel itself through the Triton
interpreter (a subprocess, as in ``test_geglu_gemm.py``): outputs against the float64 truth with M, I and
C not multiples of the tiles (zero-filled loads, clipped stores), no bias, a float32 bias, the tile loop
nested and flattened, fewer programs than tiles (the persistent walk), fresh buffers NaN-filled so an
unwritten tile fails; the recorder and the pre-compiler's key of a descriptor argument.

GPU (mark ``gpu``): at the SD-1.5 feed-forward shapes (batch 2, and the batch-16 outer level that takes
the flattened loop), fp16 / bf16, against the float32 reference and the float64 truth; the same bits as
the pointer kernel's up to float32 summation order; replay in a CUDA graph reads the new input.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ldm_sdk.accel import geglu_gemm as G
from ldm_sdk.accel import geglu_tma as T
from ldm_sdk.accel.triton_kernels import KernelRecorder, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

try:  # under pytest (its importlib mode registers the tests.accel package)
    from tests.accel.test_geglu_gemm import (
        SD15_FF,
        assert_near_truth,
        assert_replays_in_a_graph,
        geglu_linear_truth,
        make_inputs,
    )
except ModuleNotFoundError:  # run as the interpreter script: this folder is sys.path[0]
    from test_geglu_gemm import (
        SD15_FF,
        assert_near_truth,
        assert_replays_in_a_graph,
        geglu_linear_truth,
        make_inputs,
    )


# -- plan ----------------------------------------------------------------------------------------------------
def test_plan_rule() -> None:
    assert T.plan_tma(8192) == T.TmaPlan() and not T.plan_tma(T.FLATTEN_MIN_ROWS - 1).flatten
    big = T.plan_tma(T.FLATTEN_MIN_ROWS)
    assert big.flatten and big.stages == 4 and (big.block_m, big.block_n, big.num_warps) == (128, 128, 8)
    assert T.TmaPlan().tiles(8192, 1280) == 64 * 10
    assert T.TmaPlan().label() == "tma_128x128x64_w8_s3_nest_g8"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"block_m": 96}, "block_m must be a power of two >= 16"),
        ({"block_k": 8}, "block_k must be a power of two >= 16"),
        ({"num_warps": 2}, "num_warps must be 4 or 8"),
        ({"stages": 0}, "stages must be an int >= 1"),
        ({"group_m": True}, "group_m must be an int >= 1"),
    ],
)
def test_plan_validation(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        T.TmaPlan(**kwargs)  # type: ignore[arg-type]


# -- where it runs -------------------------------------------------------------------------------------------
def test_not_on_the_cpu_under_auto() -> None:
    x, w, _ = make_inputs((4, 5), 32, 16, torch.float16)
    assert not T.tma_device(x.device) and not T.tma_fits(x.reshape(-1, 32), w)


def test_pays_reaches_640_channels_where_tma_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = make_inputs((2, 3), 640, 16, torch.float16)
    assert not G.geglu_linear_pays(x, w, b, "triton")  # pointer kernel: C <= 320 only
    monkeypatch.setattr(G, "tma_device", lambda device: True)
    assert G.geglu_linear_pays(x, w, b, "triton")
    wide, ww, wb = make_inputs((2, 3), 1280, 16, torch.float16)
    assert not G.geglu_linear_pays(wide, ww, wb, "triton")  # cuBLAS + the gating kernel from C = 1280


def test_unaligned_input_is_refused() -> None:
    x, w, b = make_inputs((3, 5), 40, 16, torch.float16)
    rows = x.reshape(-1, 40)[:, 1:33]  # a view whose base pointer is off 16-byte alignment
    with pytest.raises(ValueError, match="16-byte aligned"):
        T.geglu_linear_tma(rows, w[:, :32].contiguous(), b, torch.empty(15, 16, dtype=torch.float16))


# -- the kernel in the Triton interpreter (CPU) --------------------------------------------------------------
def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1; returns what was checked."""
    from ldm_sdk.accel.precompile import _spec

    done: list[str] = []
    small = T.TmaPlan(block_m=32, block_n=16, block_k=16, num_warps=4, stages=2, group_m=2)
    cases = [
        # lead dims, C, inner, bias, plan, programs
        ((37,), 48, 40, True, small, 3),  # 2 x 3 tiles over 3 programs, ragged M / I, 3 K steps
        ((2, 19), 40, 24, True, T.TmaPlan(32, 16, 16, 4, 2, flatten=True, group_m=2), 2),  # K tail, flat
        ((33,), 72, 24, False, small, 1),  # no bias, one program walks every tile
        ((3, 7), 64, 64, True, T.TmaPlan(32, 32, 32, 4, 3), 64),  # more programs allowed than tiles
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for lead, channels, inner, has_bias, plan, programs in cases:
            x, w, b = make_inputs(lead, channels, inner, torch.float16, seed=len(done))
            bias = b if has_bias else None
            x2 = x.reshape(-1, channels)
            out = torch.empty(x2.shape[0], inner, dtype=torch.float16)
            T.geglu_linear_tma(x2, w, bias, out, plan=plan, sms=programs)
            what = f"{lead} C={channels} I={inner} bias={has_bias} {plan.label()} programs={programs}"
            assert_near_truth(out, geglu_linear_truth(x2, w, bias), what)
            done.append(what)
        # through geglu_linear_triton with a TmaPlan, a float32 bias, batched input
        x, w, b = make_inputs((2, 9), 32, 16, torch.float16, seed=11)
        out = G.geglu_linear_triton(x, w, b.float(), plan=small)
        assert out.shape == (2, 9, 16)
        assert_near_truth(out, geglu_linear_truth(x, w, b.float()), "geglu_linear_triton(plan=TmaPlan)")
        done.append("geglu_linear_triton with a TmaPlan")
        # bf16 is refused here: the interpreter's bf16 dot is wrong
        try:
            G.geglu_linear_triton(x.bfloat16(), w.bfloat16(), b, plan=small)
        except ValueError as exc:
            assert "interpreter" in str(exc)
            done.append("bf16 refused in the interpreter")
        # recorder: one launch, descriptors as arguments, the output left unwritten; the pre-compiler keys a
        # descriptor by dtype, device and block
        recorder = KernelRecorder()
        out = torch.empty(18, 16, dtype=torch.float16)
        T.geglu_linear_tma(x.reshape(-1, 32), w, b, out, plan=small, sms=2, recorder=recorder)
        assert len(recorder) == 1 and torch.isnan(out).all()
        launch = recorder.launches[0]
        # one 32 x 16 tile: one program though two were allowed
        assert launch.grid == (1,) and launch.kwargs["PROGRAMS"] == 1 and not launch.kwargs["FLATTEN"]
        assert _spec(launch.args[0]) == ("descriptor", torch.float16, torch.device("cpu"), (32, 16))
        assert _spec(launch.args[1]) == ("descriptor", torch.float16, torch.device("cpu"), (16, 16))
        done.append("recorder and the pre-compiler's key")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_tma_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 7, done


# -- GPU -----------------------------------------------------------------------------------------------------
def _hopper() -> bool:
    return torch.cuda.is_available() and T.tma_device(torch.device("cuda"))


@pytest.mark.gpu
def test_tma_kernel_on_sd15_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _hopper():
        pytest.skip("the TMA kernel needs a GPU of compute capability >= 9.0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    failures = []
    shapes = [(2, *ff) for ff in SD15_FF] + [(16, 320, 1280, 4096)]  # the last takes the flattened loop
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            for batch, channels, inner, tokens in shapes:
                x, w, b = make_inputs((batch, tokens), channels, inner, dtype, device="cuda", seed=channels)
                assert T.tma_fits(x.reshape(-1, channels), w)
                out = G.geglu_linear_triton(x, w, b)  # no plan: the TMA kernel
                pointer = G.geglu_linear_triton(
                    x, w, b, plan=G.plan_geglu_gemm(batch * tokens, inner, channels)
                )
                what = f"{(batch, tokens, channels)} -> {inner} {dtype}"
                for name, ref in (
                    ("float32 reference", G.geglu_linear_reference(x, w, b)),
                    ("float64 truth", geglu_linear_truth(x, w, b)),
                    ("pointer kernel", pointer.double()),
                ):
                    try:
                        assert_near_truth(out, ref, f"{what} vs {name}")
                    except AssertionError as exc:
                        failures.append(str(exc))
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
def test_tma_kernel_replays_in_a_cuda_graph() -> None:
    if not _hopper():
        pytest.skip("the TMA kernel needs a GPU of compute capability >= 9.0")
    with torch.no_grad():
        assert_replays_in_a_graph(G.geglu_linear_triton)  # no plan on Hopper: the TMA kernel


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
