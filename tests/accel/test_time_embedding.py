"""``ldm_sdk.accel.time_embedding``: all fused ResBlocks' embedding projections of a UNet as one GEMM.

The independent reference is each block's own ``conv1.bias + Linear(silu(emb))`` in float64, and the
unfused eager UNet for whole calls.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import fuse_blocks, fuse_model
from ldm_sdk.accel.block_fusion import FusedResBlock
from ldm_sdk.accel.time_embedding import EmbeddingShifts, share_embedding_projection
from ldm_sdk.models.unet import ResBlock, UNetModel
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
