"""The UNet's skip concatenation as one Triton copy (``ldm_sdk.accel.skip_concat``).

* CPU: dispatch (``auto`` / ``reference`` run ``torch.cat`` off CUDA; NCHW maps, other dtypes or sizes
  always do), errors that say what the kernel takes, and ``FusedUNetModel`` (what ``fuse_blocks`` makes of
  a UNet) computing the same as the unfused UNet and switching back on ``unfuse_model``;
* the kernel through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, so
  :func:`test_kernel_in_the_interpreter` runs this file as a script in a subprocess): the same bits as
  ``torch.cat`` for channel counts that are and are not multiples of the tile, fp16 / bf16 / fp32;
* GPU (mark ``gpu``): the SD-1.5 shapes at batch 2, eager and under graph replay.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import fuse_blocks, fuse_model, unfuse_model
from ldm_sdk.accel import skip_concat as S
from ldm_sdk.accel.fused_unet import FusedUNetModel
from ldm_sdk.accel.triton_kernels import triton_available
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan
from ldm_sdk.testing.tiny import SD1, random_bundle


def maps(
    n: int, ca: int, cb: int, h: int, w: int, dtype: torch.dtype, device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(ca + cb + h)
    a = (
        torch.randn(n, ca, h, w, generator=g)
        .to(dtype)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    b = (
        torch.randn(n, cb, h, w, generator=g)
        .to(dtype)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    return a, b


def test_off_cuda_torch_cat_runs() -> None:
    a, b = maps(2, 8, 4, 3, 5, torch.float32)
    for backend in ("auto", "reference"):
        assert torch.equal(S.concat_channels(a, b, backend=backend), torch.cat([a, b], 1))  # type: ignore[arg-type]
    nchw = torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 2)
    assert torch.equal(S.concat_channels(*nchw), torch.cat(nchw, 1))


def test_a_second_map_of_a_dividing_batch_is_repeated() -> None:
    a, b = maps(6, 8, 4, 3, 5, torch.float32)
    for rows in (1, 2, 3):
        want = torch.cat([a, torch.cat([b[:rows]] * (6 // rows))], 1)
        for backend in ("auto", "reference"):
            assert torch.equal(S.concat_channels(a, b[:rows], backend=backend), want)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # torch.cat's own error: 4 rows do not divide 6
        S.concat_channels(a, b[:4])


def test_errors_say_what_the_kernel_takes() -> None:
    a, b = maps(1, 8, 4, 3, 5, torch.float16)
    with pytest.raises(ValueError, match="unknown backend"):
        S.concat_channels(a, b, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one size, the second's batch dividing the first's"):
        S.concat_channels(a, b[:, :, :2], backend="triton")
    a3, b2 = maps(3, 8, 4, 3, 5, torch.float16)[0], maps(2, 8, 4, 3, 5, torch.float16)[1]
    with pytest.raises(ValueError, match="the second's batch dividing the first's"):
        S.concat_channels(a3, b2, backend="triton")
    with pytest.raises(ValueError, match="channels_last"):
        S.concat_channels(a.contiguous(), b, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        S.concat_channels(a, b.float(), backend="triton")


def test_fused_unet_concatenates_as_the_unfused_one() -> None:
    bundle = random_bundle(SD1).eval()
    unet = bundle.unet
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5.0, 500.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        before = unet(x, t, ctx)
        fuse_model(bundle, backend="reference")
        fuse_blocks(bundle, backend="reference")
        assert type(bundle.unet) is FusedUNetModel
        torch.testing.assert_close(bundle.unet(x, t, ctx), before, rtol=2e-5, atol=2e-5)
    unfuse_model(bundle.unet)
    assert type(bundle.unet) is UNetModel


def interpreter_checks() -> list[str]:
    done: list[str] = []
    with unwritten_memory_is_nan():
        for n, ca, cb, h, w, dtype in (
            (2, 40, 24, 3, 5, torch.float16),
            (1, 200, 72, 2, 3, torch.bfloat16),  # a tile straddles the two inputs
            (1, 8, 136, 4, 1, torch.float32),
        ):
            a, b = maps(n, ca, cb, h, w, dtype)
            out = S.concat_channels_triton(a, b)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(out, torch.cat([a, b], 1)), (ca, cb, dtype)
            done.append(f"{(n, ca, cb, h, w)} {dtype}")
        for n, rows in ((2, 1), (6, 2)):  # the skip's batch repeated: output row p reads its row p mod
            a, b = maps(n, 40, 24, 3, 5, torch.float16)
            out = S.concat_channels_triton(a, b[:rows])
            assert torch.equal(out, torch.cat([a, torch.cat([b[:rows]] * (n // rows))], 1)), (n, rows)
            done.append(f"{n} rows from {rows}")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 5


@pytest.mark.gpu
def test_sd15_shapes_on_cuda() -> None:
    for ca, cb, size in ((1280, 1280, 8), (1280, 640, 32), (320, 320, 64), (640, 320, 64)):
        a, b = maps(2, ca, cb, size, size, torch.float16, "cuda")
        out = S.concat_channels(a, b)
        assert torch.equal(out, torch.cat([a, b], 1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = S.concat_channels(a, b)
        a.mul_(-1)  # new values in the captured inputs: the replay reads them
        b.add_(3)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, torch.cat([a, b], 1)) and not torch.equal(static, out)
        shared = S.concat_channels(a, b[:1])  # a skip the guidance halves share
        assert torch.equal(shared, torch.cat([a, torch.cat([b[:1], b[:1]])], 1))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
