"""``ldm_sdk.accel.time_embedding``: all fused ResBlocks' embedding projections of a UNet as one GEMM, and
the timestep features kernel.

The independent reference is each block's own ``conv1.bias + Linear(silu(emb))`` in float64, and the
unfused eager UNet for whole calls. The features kernel is compared with
:func:`~ldm_sdk.models.embeddings.timestep_embedding`: in the Triton interpreter to float32 rounding (numpy's
``exp`` / ``cos`` / ``sin`` stand in for libdevice's there), on the GPU (mark ``gpu``) bit for bit with
torch's CUDA kernels.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import fuse_blocks, fuse_model
from ldm_sdk.accel.block_fusion import FusedResBlock
from ldm_sdk.accel.fused_unet import FusedUNetModel
from ldm_sdk.accel.time_embedding import EmbeddingShifts, share_embedding_projection, timestep_features
from ldm_sdk.accel.triton_kernels import triton_available
from ldm_sdk.models.attention import repeat_batch
from ldm_sdk.models.embeddings import timestep_embedding
from ldm_sdk.models.unet import ResBlock, UNetModel
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan
from ldm_sdk.testing.tiny import SD1, random_bundle


def tiny_unet() -> UNetModel:
    return random_bundle(SD1).unet.eval()


def call(unet: UNetModel, t: float, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([t, t / 2]), context=ctx)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def fused_blocks(unet: UNetModel) -> list[FusedResBlock]:
    return [m for m in unet.modules() if isinstance(m, FusedResBlock)]


def test_fuse_blocks_shares_one_projection_per_unet() -> None:
    unet = tiny_unet()
    n_res = sum(isinstance(m, ResBlock) for m in unet.modules())
    fuse_model(unet, backend="reference")
    report = fuse_blocks(unet, backend="reference")
    blocks = fused_blocks(unet)
    assert len(blocks) == n_res > 1 and report.shared_embedding == n_res
    assert "embedding projections as one GEMM" in str(report)
    shared = blocks[0].emb_shifts
    assert isinstance(shared, EmbeddingShifts) and len(shared) == n_res
    assert all(b.emb_shifts is shared for b in blocks)
    assert [b.emb_shift_index for b in blocks] == list(range(n_res))
    assert fuse_blocks(unet, backend="reference").shared_embedding == 0  # idempotent


def test_each_block_reads_its_own_projection() -> None:
    unet = tiny_unet()
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    blocks = fused_blocks(unet)
    shared = blocks[0].emb_shifts
    assert shared is not None
    emb = torch.randn(2, blocks[0].emb_layers[1].in_features, generator=torch.Generator().manual_seed(0))
    for i, block in enumerate(blocks):
        got = shared.shift(i, emb)
        assert got is not None
        proj = block.emb_layers[1]
        e = emb.double()
        truth = (
            block.in_layers[-1].bias.double()
            + proj.bias.double()
            + (e * torch.sigmoid(e)) @ proj.weight.double().t()
        )
        assert got.shape == truth.shape and rel_err(got, truth) < 1e-6


def test_projection_runs_once_per_call_and_matches_the_unfused_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    shared = fused_blocks(unet)[0].emb_shifts
    assert shared is not None
    calls = []
    project = EmbeddingShifts._project
    monkeypatch.setattr(EmbeddingShifts, "_project", lambda self, emb: calls.append(1) or project(self, emb))
    for t in (999.0, 10.0):  # a new emb per call: no stale result
        assert rel_err(call(unet, t), call(plain, t)) < 2e-5
    assert len(calls) == 2


def test_shared_guidance_input_projects_the_whole_batch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """x once with a context of two copies: the shared layers' embedding is the leading rows of the whole
    batch's, and the fused UNet forms one projection for both (sliced), matching the repeated batch."""
    unet = tiny_unet()
    plain = copy.deepcopy(unet)
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    calls = []
    project = EmbeddingShifts._project
    monkeypatch.setattr(
        EmbeddingShifts, "_project", lambda self, emb: calls.append(emb.shape) or project(self, emb)
    )
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, unet.in_channels, 16, 16, generator=g), torch.randn(4, 5, 32, generator=g)
    t = torch.tensor([700.0, 30.0])
    with torch.no_grad():
        shared = unet(x, t, context=ctx)
        repeated = plain(torch.cat([x, x]), torch.cat([t, t]), context=ctx)
    assert rel_err(shared, repeated) < 2e-5
    assert calls == [torch.Size([4, unet.time_embed[-1].out_features])]  # one projection, 4 rows
    shifts = fused_blocks(unet)[0].emb_shifts
    assert shifts is not None
    emb = torch.randn(4, unet.time_embed[-1].out_features)
    head, whole = shifts.shift(0, emb[:2]), shifts.shift(0, emb)
    assert head is not None and whole is not None and torch.equal(head, whole[:2])


def test_state_dict_unchanged_and_new_memory_falls_back() -> None:
    unet = tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = copy.deepcopy(unet)
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    assert list(unet.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    unet.load_state_dict(state)  # in place: the shared storages stay shared
    blocks = fused_blocks(unet)
    shared = blocks[0].emb_shifts
    assert shared is not None
    emb = torch.randn(2, blocks[0].emb_layers[1].in_features)
    assert shared.shift(0, emb) is not None
    blocks[1].emb_layers[1].weight.data = blocks[1].emb_layers[1].weight.detach().clone()
    assert shared.shift(0, torch.randn(2, emb.shape[1])) is None  # every block projects on its own now
    assert rel_err(call(unet, 500.0), call(plain, 500.0)) < 2e-5


def test_mixed_or_single_blocks_are_not_shared() -> None:
    unet = tiny_unet()
    fuse_model(unet, backend="reference")
    blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert share_embedding_projection(blocks[:1]) is None
    blocks[0].emb_layers[1].double()
    assert share_embedding_projection(blocks) is None
    assert all(getattr(b, "emb_shifts", None) is None for b in blocks)


# -- timestep features ---------------------------------------------------------------------------------------
def reference_features(t: Tensor, dim: int, dtype: torch.dtype, repeats: int = 1) -> Tensor:
    return timestep_embedding(repeat_batch(t, repeats), dim).to(dtype)


def test_features_off_cuda_are_the_torch_ops() -> None:
    t = torch.tensor([0.0, 1.5, 999.0], dtype=torch.float64)
    for backend in ("auto", "reference"):
        got = timestep_features(t, 320, torch.float16, 2, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(got, reference_features(t, 320, torch.float16, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        timestep_features(t, 8, torch.float32, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        timestep_features(t, 8, torch.float32, 0)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_features_kernel_refuses_what_it_does_not_take() -> None:
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="CUDA device with Triton"):  # outside the interpreter, on the CPU
        timestep_features(t, 8, torch.float32, backend="triton")


def test_the_fused_unet_embeds_as_the_unfused_one() -> None:
    unet = tiny_unet()
    t = torch.tensor([3.0, 250.5])
    with torch.no_grad():
        want = unet.embed(t, None, 2)
        fuse_model(unet, backend="reference")
        fuse_blocks(unet, backend="reference")
        assert isinstance(unet, FusedUNetModel)
        assert torch.equal(unet.embed(t, None, 2), want)


def interpreter_checks() -> list[str]:
    done: list[str] = []
    with unwritten_memory_is_nan():
        for t, dim, dtype, repeats in (
            (torch.tensor([0.0, 1.0, 17.25, 999.0], dtype=torch.float64), 320, torch.float32, 1),
            (torch.tensor([981, 1], dtype=torch.int64), 7, torch.float32, 2),  # odd: a trailing zero
            (torch.tensor([500.0], dtype=torch.float32), 64, torch.float16, 3),
        ):
            got = timestep_features(t, dim, dtype, repeats, backend="triton")
            want = reference_features(t, dim, dtype, repeats)
            assert got.shape == want.shape and got.dtype == dtype
            # numpy's float32 exp / cos / sin here, libdevice's on the GPU: equal to a few float32 ulps of
            # the argument, which reaches about 1000 radians (an ulp there: 6e-5)
            tol = 2e-3 if dtype == torch.float16 else 5e-4
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
            if dim % 2:
                assert torch.equal(got[:, -1], torch.zeros_like(got[:, -1]))
            done.append(f"{dim} {dtype} x{repeats}")
    return done


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_features_kernel_in_the_interpreter() -> None:
    assert len(run_interpreted(__file__, "--interpreter-checks")) == 3


@pytest.mark.gpu
def test_features_kernel_same_bits_as_torch_on_cuda() -> None:
    steps = torch.linspace(0, 999, 50).round()
    frac = torch.tensor([0.5, 1e-3, 123.456, 998.999999])
    for t in (steps.double(), frac.double(), frac.float(), steps.long()):
        for dim, dtype, repeats in (
            (320, torch.float16, 2),
            (320, torch.bfloat16, 1),
            (192, torch.float32, 1),
        ):
            t_cuda = t.cuda()
            got = timestep_features(t_cuda, dim, dtype, repeats)
            want = reference_features(t_cuda, dim, dtype, repeats)
            assert torch.equal(got, want), (t.dtype, dim, dtype, (got.float() - want.float()).abs().max())
    odd = timestep_features(steps.cuda(), 7, torch.float32)
    assert torch.equal(odd, reference_features(steps.cuda(), 7, torch.float32))
    assert math.isfinite(float(odd.abs().max()))


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
