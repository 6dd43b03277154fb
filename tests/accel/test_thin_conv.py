"""``ldm_sdk.accel.thin_conv``: 3x3 convolutions with few output channels as a tap GEMM + Triton tap sum.

The independent oracle is ``F.conv2d`` in float64 from the same inputs. CPU: the reference and dispatch,
the ``W_taps`` layout and the tap-sum formula in plain torch, errors, the fused ``nn.Conv2d`` class and
which convolutions qualify, and the kernel itself under the Triton interpreter (this file re-run as a
script with ``TRITON_INTERPRET=1``, fresh buffers NaN-filled so an unwritten output fails): C_out 3, 4, 5
and 8, odd sizes, batch 2, partial tiles, with and without bias. GPU (mark ``gpu``): the SD UNet's and
the kl-f8 decoder's ``conv_out`` shapes in fp16 / bf16 within a few output ulps (relative to max|ref|) of
float64 ``F.conv2d``, the fused module, and replay under a CUDA graph with new inputs and weights.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel import thin_conv as T
from ldm_sdk.accel.triton_kernels import KernelRecorder, compare_ulps, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan


def conv_inputs(
    shape: tuple[int, int, int, int],
    c_out: int,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    with_bias: bool = True,
    channels_last: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x`` (channels_last unless told), a 3x3 weight scaled to keep outputs O(1), and a bias."""
    g = torch.Generator().manual_seed(sum(shape) + c_out)
    x = torch.randn(shape, generator=g)
    w = torch.randn(c_out, shape[1], 3, 3, generator=g) / (9 * max(shape[1], 1)) ** 0.5
    b = torch.randn(c_out, generator=g) if with_bias else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device, dtype).contiguous(memory_format=fmt)
    return x, w.to(device, dtype), b.to(device, dtype) if b is not None else None


def oracle(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """float64 ``F.conv2d`` of the inputs as they are (exact up to float64 rounding)."""
    return F.conv2d(x.double(), w.double(), b.double() if b is not None else None, padding=1)


def within_ulps(out: Tensor, ref: Tensor, ulps: float = 2.0) -> bool:
    """``|out - ref| <= ulps * eps(out.dtype) * max|ref|`` everywhere."""
    bound = ulps * torch.finfo(out.dtype).eps * float(ref.abs().max())
    return float((out.double() - ref).abs().max()) <= bound


# -- reference, dispatch, formula --------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_reference_is_conv2d(channels_last: bool, with_bias: bool) -> None:
    x, w, b = conv_inputs((2, 5, 7, 3), 4, torch.float64, with_bias=with_bias, channels_last=channels_last)
    for out in (T.thin_conv3x3_reference(x, w, b), T.thin_conv3x3(x, w, b)):  # "auto" on the CPU
        assert torch.equal(out, F.conv2d(x, w, b, padding=1))
        assert out.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    x32, w32, b32 = (t.float() if t is not None else None for t in (x, w, b))
    assert torch.equal(T.thin_conv3x3(x32, w32, b32, backend="reference"), F.conv2d(x32, w32, b32, padding=1))
    xh, wh, bh = (t.half() if t is not None else None for t in (x, w, b))
    half = T.thin_conv3x3_reference(xh, wh, bh)  # float32 maths, rounded once
    assert half.dtype == torch.float16 and compare_ulps(half, oracle(xh, wh, bh)).within_bound


def test_tap_weights_layout() -> None:
    w = torch.randn(3, 5, 3, 3)
    taps = T.tap_weights(w)
    assert taps.shape == (5, 32) and taps.is_contiguous()  # 27 columns padded to a multiple of 8
    for dy in range(3):
        for dx in range(3):
            assert torch.equal(taps[:, (3 * dy + dx) * 3 : (3 * dy + dx + 1) * 3], w[:, :, dy, dx].T)
    assert not taps[:, 27:].any()
    assert T.tap_weights(torch.randn(8, 2, 3, 3)).shape == (2, 72)  # already a multiple of 8


def test_tap_sum_formula_is_the_convolution() -> None:
    """The module doc's formula, in plain float64 torch: T = rows @ W_taps, then the nine shifted taps."""
    x, w, b = conv_inputs((2, 6, 5, 7), 4, torch.float64)
    n, c_in, h, wd = x.shape
    t = (x.permute(0, 2, 3, 1).reshape(-1, c_in) @ T.tap_weights(w)).reshape(n, h, wd, -1)
    t = F.pad(t, (0, 0, 1, 1, 1, 1))  # zero source pixels around the map (W, then H)
    out = b.expand(n, h, wd, 4).clone()
    for dy in range(3):
        for dx in range(3):
            out += t[:, dy : dy + h, dx : dx + wd, (3 * dy + dx) * 4 : (3 * dy + dx + 1) * 4]
    assert torch.allclose(out.permute(0, 3, 1, 2), oracle(x, w, b), rtol=1e-12, atol=1e-12)


def _call(backend: str = "auto", **changes: object):
    """A call of thin_conv3x3 on a valid CPU fp16 channels_last input with one argument changed."""
    x, w, b = conv_inputs((1, 2, 3, 3), 4, torch.float16)
    args = {"x": x, "weight": w, "bias": b, **changes}
    return lambda: T.thin_conv3x3(args["x"], args["weight"], args["bias"], backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (_call(x=torch.zeros(2, 3, 4)), r"\(N, C, H, W\)"),
        (_call(x=torch.zeros(1, 2, 3, 3, dtype=torch.int32)), "floating-point"),
        (_call(weight=torch.zeros(4, 3, 3, 3)), r"\(C_out, C_in, 3, 3\) tensor with C_in = 2"),
        (_call(weight=torch.zeros(4, 2, 1, 1)), r"\(C_out, C_in, 3, 3\)"),
        (_call(bias=torch.zeros(3)), "None or a 1-D tensor of 4 values"),
        (_call("cuda"), "valid: auto, triton, reference"),
        (_call("triton", x=torch.zeros(1, 2, 3, 3, dtype=torch.float16)), "a channels_last x"),
        (_call("triton", weight=torch.zeros(4, 2, 3, 3)), "weight of x's dtype"),
        (
            _call(
                "triton",
                x=torch.zeros(1, 2, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
                weight=torch.zeros(4, 2, 3, 3, dtype=torch.float64),
            ),
            "float16, bfloat16, float32",
        ),
        (
            lambda: T.thin_conv3x3_triton(*conv_inputs((1, 2, 3, 3), 4, torch.float16), tile=24),
            "power of two",
        ),
    ],
)
def test_errors_say_what_is_valid(call, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_backend_refuses_the_cpu_and_autograd() -> None:
    x, w, b = conv_inputs((1, 2, 3, 3), 4, torch.float16)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        with pytest.raises(ValueError, match="runs CUDA tensors"):
            T.thin_conv3x3(x, w, b, backend="triton")
    with pytest.raises(RuntimeError, match="no backward"):
        T.thin_conv3x3(x, w.requires_grad_(), b, backend="triton")


# -- the fused module --------------------------------------------------------------------------------------
def test_fused_conv_keeps_its_parameters_and_output() -> None:
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 4, 3, padding=1).eval()
    fused = copy.deepcopy(plain)
    fused.__class__ = T.FusedThinConv2d
    assert fused.fusion_backend == "auto" and fused.unfused_class is nn.Conv2d
    state, fused_state = plain.state_dict(), fused.state_dict()
    assert state.keys() == fused_state.keys() and all(torch.equal(state[k], fused_state[k]) for k in state)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))  # "auto" on the CPU: nn.Conv2d.forward itself
        fused.fusion_backend = "reference"
        assert torch.allclose(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    fused.train()
    assert torch.equal(fused(x), nn.Conv2d.forward(fused, x))  # training: the original path
    fused.__class__ = fused.unfused_class
    assert type(fused) is nn.Conv2d


def test_thin_conv_fusable() -> None:
    assert T.thin_conv_fusable(nn.Conv2d(320, 4, 3, padding=1)) is None
    assert T.thin_conv_fusable(nn.Conv2d(128, 3, 3, padding=1, bias=False)) is None
    assert T.thin_conv_fusable(nn.Conv2d(8, T.THIN_MAX_OUT, 3, padding=1)) is None
    rejected = {
        "wide": nn.Conv2d(320, 320, 3, padding=1),
        "1x1": nn.Conv2d(4, 4, 1),
        "stride": nn.Conv2d(4, 4, 3, stride=2, padding=1),
        "padding": nn.Conv2d(4, 4, 3, padding=0),
        "dilation": nn.Conv2d(4, 4, 3, padding=1, dilation=2),
        "groups": nn.Conv2d(4, 4, 3, padding=1, groups=2),
        "reflect": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        "subclass": T.FusedThinConv2d(4, 4, 3, padding=1),
        "other": nn.Linear(4, 4),
    }
    for name, module in rejected.items():
        reason = T.thin_conv_fusable(module)
        assert isinstance(reason, str) and 0 < len(reason) <= 60, (name, reason)
    assert T.thin_conv_fusable(rejected["wide"]) == "320 output channels (thin: <= 8)"


# -- the kernel under the Triton interpreter ---------------------------------------------------------------
def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1; returns what was checked."""
    done: list[str] = []
    cases = [
        # shape, C_out, dtype, tile, bias
        ((2, 5, 7, 9), 4, torch.float16, 64, True),  # 16 pixels per program, a partial last tile
        ((2, 6, 5, 3), 3, torch.bfloat16, 32, True),  # C_out 3 of a 4-wide channel tile
        ((2, 7, 9, 5), 3, torch.float16, 4096, False),  # one program, no bias
        ((1, 16, 4, 5), 5, torch.float32, 128, True),  # 45 tap columns padded to 48
        ((2, 4, 3, 7), 8, torch.float16, 4096, True),  # 72 tap columns, no padding
        ((1, 3, 1, 1), 4, torch.float32, 4096, True),  # a 1x1 map: only the centre tap
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for shape, c_out, dtype, tile, with_bias in cases:
            x, w, b = conv_inputs(shape, c_out, dtype, with_bias=with_bias)
            out = T.thin_conv3x3_triton(x, w, b, tile=tile)
            assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype, shape
            report = compare_ulps(out, oracle(x, w, b))
            assert report.within_bound, (shape, c_out, dtype, str(report))
            done.append(f"{shape} -> {c_out} {dtype} tile={tile}: {report}")
        x, w, b = conv_inputs((2, 4, 5, 5), 4, torch.float16)
        assert torch.equal(T.thin_conv3x3(x, w, b, backend="triton"), T.thin_conv3x3_triton(x, w, b))
        conv = nn.Conv2d(4, 4, 3, padding=1).half().eval()
        conv.__class__ = T.FusedThinConv2d
        conv.fusion_backend = "triton"
        assert compare_ulps(conv(x), oracle(x, conv.weight, conv.bias)).within_bound
        recorder = KernelRecorder()
        conv.kernel_recorder = recorder
        assert conv(x).isnan().all() and len(recorder) == 1  # recorded, not launched: output unwritten
        done.append("dispatch, fused module, recorder")
        empty = T.thin_conv3x3_triton(*conv_inputs((0, 4, 3, 3), 3, torch.float16))
        assert empty.shape == (0, 3, 3, 3)
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 7


# -- GPU ---------------------------------------------------------------------------------------------------
SD_SHAPES = [((2, 320, 64, 64), 4), ((16, 320, 64, 64), 4), ((1, 128, 512, 512), 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd_conv_out_shapes_on_cuda(dtype: torch.dtype) -> None:
    with torch.no_grad():
        for shape, c_out in SD_SHAPES:
            x, w, b = conv_inputs(shape, c_out, dtype, "cuda")
            recorder = KernelRecorder()
            T.thin_conv3x3(x, w, b, recorder=recorder)
            assert len(recorder) == 1, "backend='auto' did not take the kernel path"
            out = T.thin_conv3x3(x, w, b)
            ref = oracle(x, w, b)
            assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
            assert within_ulps(out, ref), (shape, str(compare_ulps(out, ref)))
            conv = nn.Conv2d(shape[1], c_out, 3, padding=1).to("cuda", dtype).eval()
            conv.__class__ = T.FusedThinConv2d
            assert within_ulps(conv(x), oracle(x, conv.weight, conv.bias)), shape


@pytest.mark.gpu
def test_cuda_graph_replay_takes_new_inputs_and_weights() -> None:
    x, w, b = conv_inputs((2, 320, 64, 64), 4, torch.float16, "cuda")
    assert b is not None
    with torch.no_grad():
        T.thin_conv3x3(x, w, b)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = T.thin_conv3x3(x, w, b)
        x2, w2, b2 = conv_inputs((2, 320, 64, 64), 4, torch.float16, "cuda", with_bias=True)
        x.copy_(x2.flip(-1))
        w.copy_(-2 * w2)
        b.copy_(b2 + 1)  # type: ignore[operator]
        graph.replay()
        torch.cuda.synchronize()
        assert within_ulps(out, oracle(x, w, b))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
