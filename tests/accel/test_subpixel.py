"""The sub-pixel form of nearest 2x upsampling + 3x3 convolution (``ldm_sdk.accel.subpixel``) against the
plain ``interpolate`` + ``conv2d`` in float64 (where both are exact up to float64 rounding), both memory
formats, odd sizes, with and without bias, and the fused modules' fallbacks."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ldm_sdk.accel.subpixel import FusedFirstStageUpsample, phase_kernels, upsample_conv
from ldm_sdk.models import autoencoder


def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (1, 4, 6, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_upsample_then_conv_in_float64(
    shape: tuple[int, ...], channels_last: bool, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    out = upsample_conv(x, w, b)
    ref = plain(x, w, b)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    if channels_last and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_phase_kernels_sum_the_taps_that_meet() -> None:
    w = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)  # rows [0 1 2] [3 4 5] [6 7 8]
    k = phase_kernels(w)
    assert k.shape == (2, 2, 1, 1, 2, 2)
    # phase (0, 0): rows [W0, W1 + W2], columns likewise
    assert k[0, 0, 0, 0].tolist() == [[0.0, 1.0 + 2.0], [3.0 + 6.0, 4.0 + 5.0 + 7.0 + 8.0]]
    # phase (1, 1): rows [W0 + W1, W2]
    assert k[1, 1, 0, 0].tolist() == [[0.0 + 1.0 + 3.0 + 4.0, 2.0 + 5.0], [6.0 + 7.0, 8.0]]
    assert k.sum(dim=(-1, -2)).flatten().tolist() == [36.0] * 4  # every phase sees all nine taps


def test_fused_module_and_its_fallback() -> None:
    torch.manual_seed(0)
    module = autoencoder.Upsample(4, True)
    x = torch.randn(2, 4, 5, 6)
    ref = module(x)
    module.__class__ = FusedFirstStageUpsample
    assert torch.allclose(module(x), ref, rtol=1e-5, atol=1e-5)
    module.train()
    assert torch.equal(module(x), autoencoder.Upsample.forward(module, x))  # training: the original path


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1, NaN-filled fresh buffers, odd sizes, partial tiles (fp16
    and float32: the interpreter converts float32 to bf16 toward zero; bf16 is checked on the GPU): the
    Triton phase kernels bit for bit against :func:`phase_kernels` rounded once (channels_last and NCHW
    weights, more input channels than one program takes), and the whole Triton path against the strided
    copies of the same bias-free convolution output plus the bias added in float32 and rounded once (what
    the interleave computes), bit for bit."""
    from ldm_sdk.accel.subpixel import PHASE_BLOCK, _phase_kernels_triton
    from ldm_sdk.testing.interpreter import unwritten_memory_is_nan

    done = []
    with unwritten_memory_is_nan(), torch.no_grad():
        for c_out, c_in, dtype, cl in (
            (3, 5, torch.float16, True),
            (2, PHASE_BLOCK + 3, torch.float32, False),
        ):
            w = torch.randn(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(c_in)).to(dtype)
            if cl:
                w = w.contiguous(memory_format=torch.channels_last)
            k = _phase_kernels_triton(w, None)
            assert k.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(k, phase_kernels(w).to(dtype).reshape(4 * c_out, c_in, 2, 2)), (c_out, c_in)
            done.append(f"phase kernels {c_out}x{c_in} {dtype}")
        for shape, c_out, dtype, with_bias in (
            ((2, 8, 5, 7), 6, torch.float16, True),
            ((1, 3, 1, 2), 200, torch.float32, True),
            ((1, 4, 3, 3), 5, torch.float16, False),
        ):
            g = torch.Generator().manual_seed(sum(shape))
            x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c_out, shape[1], 3, 3, generator=g).to(dtype)
            b = torch.randn(c_out, generator=g).to(dtype) if with_bias else None
            out = upsample_conv(x, w, b, backend="triton")
            ref = upsample_conv(x, w, None, backend="reference")
            if b is not None:
                ref = (ref.float() + b.float().view(1, -1, 1, 1)).to(dtype)
            assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref), shape
            done.append(f"{shape} -> {c_out} {dtype} bias={with_bias}")
    return done


def test_interleave_kernel_in_the_interpreter() -> None:
    from ldm_sdk.accel.triton_kernels import triton_available
    from ldm_sdk.testing.interpreter import run_interpreted

    if not triton_available():
        pytest.skip("triton is not installed")
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 5


def test_triton_backend_refuses_other_layouts() -> None:
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="channels_last"):
        upsample_conv(x, torch.randn(2, 2, 3, 3), None, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_path_on_cuda_at_the_decoder_shapes(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kl-f8 decoder upsamplings at 512 px: the Triton phase kernels bit for bit against the torch form, the
    cuDNN + interleave path bit for bit against the same bias-free convolution plus the bias rounded once,
    it and our own convolution (``implicit``, on Hopper from 128 px small maps) within a few
    half-precision ulps of float64 upsample + conv; replayed under a CUDA graph."""
    from ldm_sdk.accel import subpixel
    from ldm_sdk.accel.implicit_conv import upsample_conv_fits

    fused_calls: list[int] = []
    real = subpixel.upsample_conv_fused

    def counted(*args: Any, **kwargs: Any) -> Any:
        fused_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(subpixel, "upsample_conv_fused", counted)
    from ldm_sdk.accel.subpixel import _phase_kernels_triton

    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for c, hw in ((512, 64), (512, 128), (256, 256)):
            x = torch.randn(1, c, hw, hw, generator=g, device="cuda").to(dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            w = (torch.randn(c, c, 3, 3, generator=g, device="cuda") / (3 * c**0.5)).to(dtype)
            w = w.contiguous(memory_format=torch.channels_last)
            b = (0.2 * torch.randn(c, generator=g, device="cuda")).to(dtype)
            k = _phase_kernels_triton(w, None)
            assert torch.equal(k, phase_kernels(w).to(dtype).reshape(4 * c, c, 2, 2))
            out = upsample_conv(x, w, b, backend="triton", implicit=False)
            same_conv = upsample_conv(x, w, None, backend="reference")
            assert torch.equal(out, (same_conv.float() + b.float().view(1, -1, 1, 1)).to(dtype))
            truth = plain(x.double(), w.double(), b.double())
            calls = len(fused_calls)
            ours = upsample_conv(x, w, b, backend="triton")
            takes_ours = hw >= subpixel.SUBPIXEL_MIN_WIDTH and upsample_conv_fits(x, w) is None
            assert len(fused_calls) == calls + takes_ours, (c, hw)
            for result in (out, ours):
                err = ((result.double() - truth).abs().max() / truth.abs().max()).item()
                assert err < 8 * torch.finfo(dtype).eps, (c, hw, err)
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            upsample_conv(static_x, w, b)  # warm-up outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                static_out = upsample_conv(static_x, w, b)
            static_x.copy_(torch.randn_like(x))
            graph.replay()
            assert torch.equal(static_out, upsample_conv(static_x, w, b))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
