"""``ldm_sdk.accel.conv_bias``: convolutions whose bias the Triton bias pass adds.

The independent oracle is ``F.conv2d`` in float64 from the same inputs; on CUDA the unfused
``nn.Conv2d.forward`` itself, which must give the same bits (cuDNN's convolution, then the bias added in
float32 and rounded once). CPU: which convolutions qualify and which a UNet / decoder switches, the
fallbacks (training, no bias, other layouts, ``"auto"`` off CUDA), and the module under the Triton
interpreter (this file re-run as a script with ``TRITON_INTERPRET=1``, fresh buffers NaN-filled so an
unwritten output fails). GPU (mark ``gpu``): the SD-1.5 UNet's switched shapes in fp16 / bf16, the same
bits as the unfused module and the bias add correctly rounded.
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

from ldm_sdk.accel.block_fusion import fuse_blocks, unfuse_blocks
from ldm_sdk.accel.conv_bias import (
    FusedBiasedConv2d,
    biased_conv_fusable,
    biased_conv_sites,
    fuse_biased_convs,
)
from ldm_sdk.accel.triton_kernels import KernelRecorder, compare_ulps, triton_available
from ldm_sdk.models import autoencoder
from ldm_sdk.models import unet as unet_module
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan
from ldm_sdk.testing.tiny import SD1, random_bundle


def switched(conv: nn.Conv2d, backend: str = "auto") -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    fused.__class__ = FusedBiasedConv2d
    fused.fusion_backend = backend  # type: ignore[assignment]
    return fused


def conv_input(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str = "cpu") -> Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)


def oracle(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """float64 ``F.conv2d`` of the inputs as they are, its products rounded to ``x``'s dtype before the
    bias is added (float64), as both the unfused and the switched module store the bias-free convolution
    first: where the bias cancels the products, the product's rounding shows in many of the result's ulps."""
    y = F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding)
    if x.dtype != torch.float32:
        y = y.to(x.dtype).double()
    return y + conv.bias.double()[None, :, None, None] if conv.bias is not None else y


def test_which_convolutions_qualify() -> None:
    assert biased_conv_fusable(nn.Conv2d(4, 8, 3, padding=1)) is None
    assert biased_conv_fusable(nn.Conv2d(4, 8, 3, stride=2, padding=1)) is None
    assert biased_conv_fusable(nn.Conv2d(4, 8, 3, padding=1, bias=False)) == "no bias"
    reflect = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
    assert biased_conv_fusable(reflect) == "padding mode 'reflect' (zeros only)"

    class Sub(nn.Conv2d):
        pass

    assert biased_conv_fusable(Sub(4, 8, 3)) == "not a plain nn.Conv2d (Sub)"


def test_sites_are_the_convolutions_run_through_their_own_forward() -> None:
    bundle = random_bundle(SD1).eval()
    net = next(m for m in bundle.modules() if isinstance(m, UNetModel))
    decoder = next(m for m in bundle.modules() if isinstance(m, autoencoder.Decoder))
    sites = biased_conv_sites(bundle)
    downs = [m.op for m in net.modules() if isinstance(m, unet_module.Downsample)]
    ups = [m.conv for m in net.modules() if isinstance(m, unet_module.Upsample)]
    assert downs and ups
    expected = [net.input_blocks[0][0], *downs, *ups, decoder.conv_in]
    assert len(sites) == len(expected) and {id(m) for m in sites} == {id(m) for m in expected}
    assert fuse_biased_convs(bundle, "reference") == len(sites)
    assert all(type(m) is FusedBiasedConv2d and m.fusion_backend == "reference" for m in sites)
    assert fuse_biased_convs(bundle, "reference") == 0  # switched already


def test_fuse_blocks_switches_them_and_unfuse_restores() -> None:
    bundle = random_bundle(SD1).eval()
    sites = biased_conv_sites(bundle)
    report = fuse_blocks(bundle)
    assert report.fused["BiasedConv2d"] == len(sites)
    assert fuse_blocks(bundle).already_fused >= len(sites)
    unfuse_blocks(bundle)
    assert all(type(m) is nn.Conv2d for m in sites)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_off_cuda_and_reference_run_the_plain_forward(backend: str) -> None:
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1).eval()
    x = conv_input((2, 6, 9, 7), torch.float32)
    with torch.no_grad():
        assert torch.equal(switched(conv, backend)(x), conv(x))


def test_training_and_unbiased_convolutions_run_the_plain_forward() -> None:
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = conv_input((1, 6, 5, 5), torch.float32)
    fused = switched(conv, "triton")
    fused.train()
    assert torch.equal(fused(x), conv(x))  # training: never the kernel, gradients flow
    fused(x).sum().backward()
    assert fused.weight.grad is not None
    plain = nn.Conv2d(6, 5, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        assert torch.equal(switched(plain, "triton")(x), plain(x))


# -- the kernel path under the interpreter ------------------------------------------------------------------
def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1; returns what was checked."""
    done: list[str] = []
    cases = [
        # c_in, c_out, kernel, stride, input shape, dtype
        (4, 8, 3, 1, (1, 4, 6, 5), torch.float32),  # conv_in-like
        (8, 8, 3, 2, (2, 8, 7, 9), torch.float16),  # a downsampling convolution, odd sizes
        (6, 10, 3, 1, (2, 6, 4, 4), torch.bfloat16),
        (4, 4, 1, 1, (1, 4, 3, 3), torch.float16),  # 1x1
    ]
    with unwritten_memory_is_nan(), torch.no_grad():
        for c_in, c_out, k, stride, shape, dtype in cases:
            conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).to(dtype).eval()
            x = conv_input(shape, dtype)
            out = switched(conv, "triton")(x)
            assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype, shape
            report = compare_ulps(out, oracle(conv, x))
            if dtype == torch.float32:
                assert report.within_bound, (shape, dtype, str(report))
            else:  # the CPU's half-precision product is within 1 ulp (not correctly rounded), the bias add
                # rounds once more: at most 1.5 ulps (a CI run once had 1.25 at 0.3 % of the elements)
                assert report.max_ulps <= 1.5 and report.frac_over_1ulp < 0.01, (shape, dtype, str(report))
            done.append(f"{shape} -> {c_out} k{k} s{stride} {dtype}: {report}")
        conv = nn.Conv2d(4, 6, 3, padding=1).half().eval()
        fused = switched(conv, "triton")
        recorder = KernelRecorder()
        fused.kernel_recorder = recorder
        assert fused(conv_input((1, 4, 5, 5), torch.float16)).isnan().all() and len(recorder) == 1
        done.append("recorder: the bias launch recorded, not made")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_path_in_the_interpreter() -> None:
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 5


# -- GPU ---------------------------------------------------------------------------------------------------
#: the SD-1.5 UNet's switched convolutions at image batch 1 with guidance: conv_in (batch 1: the halves share
#: it), the three downsampling and three upsampling convolutions
SD_CASES = [
    (4, 320, 1, (1, 4, 64, 64)),
    (320, 320, 2, (2, 320, 64, 64)),
    (640, 640, 2, (2, 640, 32, 32)),
    (1280, 1280, 2, (2, 1280, 16, 16)),
    (1280, 1280, 1, (2, 1280, 16, 16)),
    (1280, 1280, 1, (2, 1280, 32, 32)),
    (640, 640, 1, (2, 640, 64, 64)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd_shapes_same_bits_as_the_plain_convolution(dtype: torch.dtype) -> None:
    with torch.no_grad():
        for c_in, c_out, stride, shape in SD_CASES:
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1).to("cuda", dtype).eval()
            conv = conv.to(memory_format=torch.channels_last)
            x = conv_input(shape, dtype, "cuda")
            out = switched(conv)(x)
            assert torch.equal(out, conv(x)), (shape, dtype)
            assert out.is_contiguous(memory_format=torch.channels_last)
            # the part the kernel computes, against float64: cuDNN's bias-free products plus the bias,
            # correctly rounded (cuDNN's own products are off the float64 convolution by up to 16 ulps
            # where they nearly cancel, in the unfused module alike)
            y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding).double()
            report = compare_ulps(out, y + conv.bias.double()[None, :, None, None], noise=0.0)
            assert report.within_bound and report.max_ulps <= 0.5, (shape, dtype, str(report))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
