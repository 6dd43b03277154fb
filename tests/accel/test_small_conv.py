"""``ldm_sdk.accel.small_conv``: 3x3 convolutions as one Triton im2col kernel and one GEMM.

The independent oracles: a tiny torch im2col (``F.pad`` and nine slices, itself checked against the closed
form element by element) for the kernel, which copies, so those checks are bit-for-bit; and ``F.conv2d``
(float64 where the path's float32 / half arithmetic is measured) for the convolution. CPU: the oracles,
the weight matrix view, dispatch, errors, the :func:`gemm_conv_pays` rule, and the kernel itself under the
Triton interpreter (this file re-run as a script with ``TRITON_INTERPRET=1``, fresh buffers NaN-filled so
an unwritten output fails). GPU (mark ``gpu``): the SD-1.5 UNet's 8x8 shapes at batch 2 and 16 in fp16 /
bf16, and replay under a CUDA graph.
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

from ldm_sdk.accel import small_conv as S
from ldm_sdk.accel.triton_kernels import KernelRecorder, triton_available
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

CL = torch.channels_last


def im2col_reference(x: Tensor) -> Tensor:
    """``(N H W, 9 C)``, tap-major, padding 1: F.pad and the nine shifted windows."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    taps = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=-1).permute(0, 2, 3, 4, 1).reshape(n * h * w, 9 * c)


def random_map(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", *, cl: bool = True) -> Tensor:
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = torch.randn(shape, generator=g).to(device, dtype)
    return x.contiguous(memory_format=CL) if cl else x.contiguous()


def conv_params(
    c_out: int, c_in: int, dtype: torch.dtype, device: str = "cpu", *, cl: bool = True
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(c_out * 1000 + c_in)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).to(device, dtype)
    b = (0.1 * torch.randn(c_out, generator=g)).to(device, dtype)
    return (w.contiguous(memory_format=CL) if cl else w.contiguous()), b


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# -- the oracles and the weight matrix -----------------------------------------------------------------------
def test_im2col_reference_is_the_closed_form() -> None:
    x = random_map((2, 3, 2, 3), torch.float32)
    cols = im2col_reference(x)
    n, c, h, w = x.shape
    assert cols.shape == (n * h * w, 9 * c)
    for ni in range(n):
        for y in range(h):
            for xi in range(w):
                for dy in range(3):
                    for dx in range(3):
                        sy, sx = y + dy - 1, xi + dx - 1
                        inside = 0 <= sy < h and 0 <= sx < w
                        want = x[ni, :, sy, sx] if inside else torch.zeros(c)
                        got = cols[(ni * h + y) * w + xi, (3 * dy + dx) * c : (3 * dy + dx + 1) * c]
                        assert torch.equal(got, want), (ni, y, xi, dy, dx)


def test_weight_matrix_is_a_view_of_channels_last_weights_and_the_gemm_is_the_conv() -> None:
    w, b = conv_params(5, 4, torch.float64)
    w9 = S.conv_weight_matrix(w)
    assert w9.shape == (36, 5)
    assert w9.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # no copy
    for co in range(5):
        for c in range(4):
            for dy in range(3):
                for dx in range(3):
                    assert w9[(3 * dy + dx) * 4 + c, co] == w[co, c, dy, dx]
    nchw = w.contiguous()
    w9_copy = S.conv_weight_matrix(nchw)
    assert w9_copy.untyped_storage().data_ptr() != nchw.untyped_storage().data_ptr()  # a copy, same values
    assert torch.equal(w9_copy, w9)
    x = random_map((2, 4, 5, 3), torch.float64)
    out = (im2col_reference(x) @ w9 + b).view(2, 5, 3, 5).permute(0, 3, 1, 2)
    assert torch.allclose(out, F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


# -- dispatch and errors on the CPU -----------------------------------------------------------------------
@pytest.mark.parametrize("cl", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_reference_and_auto_on_cpu_are_conv2d(cl: bool, with_bias: bool) -> None:
    x = random_map((2, 6, 5, 3), torch.float32, cl=cl)
    w, b = conv_params(4, 6, torch.float32, cl=cl)
    bias = b if with_bias else None
    truth = F.conv2d(x, w, bias, padding=1)
    recorder = KernelRecorder()
    for backend in ("reference", "auto"):
        assert same_bits(S.gemm_conv3x3(x, w, bias, backend=backend, recorder=recorder), truth)  # type: ignore[arg-type]
    assert len(recorder) == 0  # the CPU never takes the kernel path


def _errors() -> list[tuple[Callable[[], object], str]]:
    x = random_map((1, 3, 4, 4), torch.float32)
    w, b = conv_params(5, 3, torch.float32)
    return [
        (lambda: S.gemm_conv3x3(torch.zeros(3, 4, 4), w), r"\(N, C, H, W\)"),
        (lambda: S.gemm_conv3x3(x, torch.zeros(5, 2, 3, 3)), "C_in = 3"),
        (lambda: S.gemm_conv3x3(x, torch.zeros(5, 3, 1, 1)), r"\(C_out, C_in, 3, 3\)"),
        (lambda: S.gemm_conv3x3(x, w, torch.zeros(4)), "1-D tensor of 5 values"),
        (lambda: S.gemm_conv3x3(x, w, b, backend="cuda"), "valid: auto, triton, reference"),  # type: ignore[arg-type]
        (lambda: S.gemm_conv3x3(x.contiguous(), w, b, backend="triton"), "channels_last"),
        (lambda: S.gemm_conv3x3(x.double(), w.double(), backend="triton"), "float16, bfloat16, float32"),
        (lambda: S.gemm_conv3x3(x, w.half(), backend="triton"), "weight of x's dtype"),
        (lambda: S.gemm_conv3x3(x, w, b.half(), backend="triton"), "bias of x's dtype"),
        (lambda: S.gemm_conv3x3(x, w, b, backend="triton"), "CUDA tensors|needs triton"),
        (lambda: S.gemm_conv3x3(x.requires_grad_(), w, b, backend="triton"), "no backward"),
        (lambda: S.im2col3x3(x.contiguous()), "channels_last"),
        (lambda: S.im2col3x3(x, tile=24), "power of two"),
        (lambda: S.im2col3x3(x), "CUDA tensors|needs triton"),
        (lambda: S.conv_weight_matrix(torch.zeros(4, 3, 2, 2)), r"\(C_out, C_in, 3, 3\)"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_errors_say_what_is_valid(case: int) -> None:
    call, words = _errors()[case]
    with pytest.raises((ValueError, RuntimeError), match=words):
        call()


def test_gemm_conv_pays_rule() -> None:
    """Half-precision channels_last CUDA maps of <= GEMM_CONV_MAX_ROWS rows and >= GEMM_CONV_MIN_CHANNELS
    channels with channels_last weights; the device is checked last, so meta tensors show the other rules."""
    why = S._gemm_conv_rejection
    c = S.GEMM_CONV_MIN_CHANNELS
    side = 8 if S.GEMM_CONV_MAX_ROWS >= 128 else 1

    def meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float16, cl: bool = True) -> Tensor:
        t = torch.empty(shape, dtype=dtype, device="meta")
        return t.contiguous(memory_format=CL) if cl and t.dim() == 4 else t

    x, w = meta((2, c, side, side)), meta((c, c, 3, 3))
    assert "CUDA only" in str(why(x, w))  # every other rule passes
    assert not S.gemm_conv_pays(x, w)
    too_many = S.GEMM_CONV_MAX_ROWS + 1
    assert "GEMM_CONV_MAX_ROWS" in str(why(meta((1, c, 1, too_many)), w))
    assert "GEMM_CONV_MIN_CHANNELS" in str(why(meta((2, c - 8, side, side)), meta((c, c - 8, 3, 3))))
    assert "fp16 / bf16" in str(
        why(meta((2, c, side, side), torch.float32), meta((c, c, 3, 3), torch.float32))
    )
    assert "fp16 / bf16" in str(why(x, meta((c, c, 3, 3), torch.bfloat16)))
    assert "channels_last" in str(why(x, meta((c, c, 3, 3), cl=False)))
    assert "channels_last" in str(why(meta((2, c, side, side), cl=False), w))
    assert "3x3" in str(why(x, meta((c, c, 1, 1))))
    assert "4-D" in str(why(meta((c, side, side)), w))
    cpu = random_map((2, c, side, side), torch.float16)
    assert not S.gemm_conv_pays(cpu, conv_params(8, c, torch.float16)[0])


# -- the kernel under the Triton interpreter ----------------------------------------------------------------
def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module doc); returns what was checked. im2col bit
    for bit against the torch oracle (fp16 / float32: the interpreter converts float32 to bf16 toward zero,
    so bf16 is left to the GPU tests) with odd sizes, 1x1 / 2x3 / W = 1 maps, channel counts that are not a
    multiple of the tile, partial tiles and an empty batch; the whole float32 path against float64
    F.conv2d; the recorder gets the launch and makes none."""
    done: list[str] = []
    with unwritten_memory_is_nan(), torch.no_grad():
        cases = [
            # shape, dtype, tile
            ((2, 5, 2, 3), torch.float16, 64),  # partial channel and row tiles
            ((1, 3, 1, 1), torch.float32, 4096),  # a 1x1 map: every tap but the centre is padding
            ((2, 200, 2, 3), torch.float16, 4096),  # two channel tiles (128 + 72)
            ((3, 7, 5, 1), torch.float32, 32),  # W = 1
        ]
        for shape, dtype, tile in cases:
            x = random_map(shape, dtype)
            cols = S.im2col3x3(x, tile=tile)
            assert cols.is_contiguous() and same_bits(cols, im2col_reference(x)), (shape, dtype, tile)
            done.append(f"im2col{shape} {dtype} tile={tile}")
        assert S.im2col3x3(random_map((0, 4, 3, 3), torch.float16)).shape == (0, 36)
        done.append("im2col empty batch")
        for shape, c_out, with_bias in (
            ((2, 6, 5, 3), 4, True),
            ((1, 9, 4, 4), 7, False),
            ((1, 3, 1, 1), 2, True),
        ):
            x = random_map(shape, torch.float32)
            w, b = conv_params(c_out, shape[1], torch.float32)
            bias = b if with_bias else None
            out = S.gemm_conv3x3(x, w, bias, backend="triton")
            ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=1)
            assert out.is_contiguous(memory_format=CL)
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            assert err < 2e-6, (shape, err)
            done.append(f"gemm_conv3x3{shape} -> {c_out} bias={with_bias}")
        recorder = KernelRecorder()
        x = random_map((1, 4, 3, 3), torch.float32)
        S.im2col3x3(x, recorder=recorder)
        assert len(recorder) == 1
        done.append("recorder")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 9, done


# -- GPU -----------------------------------------------------------------------------------------------------
#: the SD-1.5 UNet's 8x8 convolutions: image batch 1 (UNet batch 2) and image batch 8 (16)
SD_SHAPES = [((2, 1280, 8, 8), 1280), ((2, 2560, 8, 8), 1280), ((16, 1280, 8, 8), 1280)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd15_shapes_on_cuda(dtype: torch.dtype) -> None:
    """The UNet's lowest-level convs: the auto path takes the kernel, im2col bit for bit, the conv within a
    few half-precision ulps of max|ref| of float64 F.conv2d (the bound of a GEMM whose rounding errors scale
    with its terms, not with each output: cuBLAS's split-K GEMMs put outputs that cancel to near zero up to
    ~180 of their own ulps off, measured on an H100 even with torch's reduced-precision reduction flags
    off, so no per-element ulp bound is claimed); and the dispatch rule."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    with torch.no_grad():
        for shape, c_out in SD_SHAPES:
            x = random_map(shape, dtype, "cuda")
            w, b = conv_params(c_out, shape[1], dtype, "cuda")
            assert same_bits(S.im2col3x3(x), im2col_reference(x)), shape
            recorder = KernelRecorder()
            S.gemm_conv3x3(x, w, b, recorder=recorder)
            assert len(recorder) == 1, shape  # "auto" took the kernel path
            out = S.gemm_conv3x3(x, w, b)
            assert out.shape == (shape[0], c_out, 8, 8) and out.is_contiguous(memory_format=CL), shape
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            assert err < 4 * torch.finfo(dtype).eps, (shape, dtype, err)
            rows = shape[0] * shape[2] * shape[3]
            assert S.gemm_conv_pays(x, w) == (rows <= S.GEMM_CONV_MAX_ROWS), shape
            assert not S.gemm_conv_pays(x, w.contiguous())  # a non-channels_last weight is copied


@pytest.mark.gpu
def test_replay_under_a_cuda_graph() -> None:
    dtype = torch.float16
    x = random_map((2, 1280, 8, 8), dtype, "cuda")
    w, b = conv_params(1280, 1280, dtype, "cuda")
    with torch.no_grad():
        S.gemm_conv3x3(x, w, b)  # warm-up (compile, cuBLAS handle) outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = S.gemm_conv3x3(x, w, b)
        x.copy_(random_map((2, 1280, 8, 8), dtype, "cuda") * 2)
        graph.replay()
        torch.cuda.synchronize()
        assert same_bits(static_out, S.gemm_conv3x3(x, w, b))
        ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        assert float((static_out.double() - ref).abs().max() / ref.abs().max()) < 4 * torch.finfo(dtype).eps


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
