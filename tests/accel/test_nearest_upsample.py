"""``ldm_sdk.accel.nearest_upsample``: nearest 2x upsampling of channels_last maps as one Triton copy.

The independent reference is ``F.interpolate(scale_factor=2, mode="nearest")``; the kernel copies, so
every check is bit-for-bit equality. CPU: dispatch, errors, the fused UNet ``Upsample`` against the plain
one, and the kernel itself under the Triton interpreter (this file re-run as a script with
``TRITON_INTERPRET=1``, fresh buffers NaN-filled so an unwritten output fails). GPU (mark ``gpu``): the
SD-1.5 UNet's upsampling shapes at batch 2 and 16, fp16 / bf16, and replay under a CUDA graph.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel import nearest_upsample as U
from ldm_sdk.accel.triton_kernels import triton_available
from ldm_sdk.models.unet import Upsample
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan


def channels_last_input(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str = "cpu") -> Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(device, dtype)
    return x.contiguous(memory_format=torch.channels_last)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def test_reference_and_auto_on_cpu_are_interpolate() -> None:
    x = channels_last_input((2, 5, 3, 4), torch.float32)
    truth = F.interpolate(x, scale_factor=2, mode="nearest")
    for out in (U.nearest_upsample2x_reference(x), U.nearest_upsample2x(x)):
        assert same_bits(out, truth) and out.is_contiguous(memory_format=torch.channels_last)
    nchw = x.contiguous()
    assert same_bits(U.nearest_upsample2x(nchw), F.interpolate(nchw, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: U.nearest_upsample2x(torch.zeros(2, 3, 4)), "4-D"),
        (lambda: U.nearest_upsample2x(torch.zeros(1, 2, 3, 3), backend="cuda"), "valid: auto, triton"),  # type: ignore[arg-type]
        (lambda: U.nearest_upsample2x_triton(torch.zeros(1, 2, 3, 3), tile=24), "power of two"),
        (
            lambda: U.nearest_upsample2x(torch.zeros(1, 2, 3, 3, dtype=torch.float64), backend="triton"),
            "float64",
        ),
    ],
)
def test_errors_say_what_is_valid(call, words: str) -> None:
    with pytest.raises((ValueError, RuntimeError), match=words):
        call()


def test_fused_upsample_equals_the_plain_one() -> None:
    plain = Upsample(6, use_conv=True).eval()
    fused = copy.deepcopy(plain)
    fused.__class__ = U.FusedUNetUpsample
    fused.fusion_backend = "auto"
    x = channels_last_input((2, 6, 5, 3), torch.float32)
    with torch.no_grad():
        assert same_bits(fused(x), plain(x))
    bare = Upsample(4, use_conv=False)
    bare.__class__ = U.FusedUNetUpsample
    bare.fusion_backend = "reference"
    y = channels_last_input((1, 4, 2, 2), torch.float32)
    assert same_bits(bare(y), F.interpolate(y, scale_factor=2, mode="nearest"))
    assert U.unet_upsample_fusable(plain) is None


def interpreter_checks() -> list[str]:
    """Run in a subprocess with TRITON_INTERPRET=1; returns what was checked."""
    done: list[str] = []
    cases = [
        # shape, dtype, tile
        ((2, 8, 3, 5), torch.float16, 16),  # 2 pixels x 8 channels per program, partial pixel tiles
        ((1, 40, 4, 4), torch.bfloat16, 64),  # channels not a power of two: partial channel tiles
        ((3, 5, 2, 7), torch.float32, 4096),  # one program
        ((1, 200, 1, 1), torch.float16, 128),  # 1x1 map, two channel tiles of 128
    ]
    with unwritten_memory_is_nan():
        for shape, dtype, tile in cases:
            x = channels_last_input(shape, dtype)
            out = U.nearest_upsample2x_triton(x, tile=tile)
            assert out.is_contiguous(memory_format=torch.channels_last), shape
            assert same_bits(out, F.interpolate(x, scale_factor=2, mode="nearest")), (shape, dtype, tile)
            done.append(f"{shape} {dtype} tile={tile}")
        empty = channels_last_input((0, 4, 3, 3), torch.float16)
        assert U.nearest_upsample2x_triton(empty).shape == (0, 4, 6, 6)
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sd15_shapes_on_cuda(dtype: torch.dtype) -> None:
    for batch in (2, 16):
        for c, hw in ((1280, 8), (1280, 16), (640, 32)):
            x = channels_last_input((batch, c, hw, hw), dtype, "cuda")
            assert same_bits(U.nearest_upsample2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    x = channels_last_input((2, 1280, 16, 16), dtype, "cuda")
    U.nearest_upsample2x(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = U.nearest_upsample2x(x)
    x.copy_(channels_last_input((2, 1280, 16, 16), dtype, "cuda") * 2)
    graph.replay()
    assert same_bits(out, F.interpolate(x, scale_factor=2, mode="nearest"))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
