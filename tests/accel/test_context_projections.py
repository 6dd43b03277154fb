"""One K / V GEMM for all of a UNet's cross-attentions (``ldm_sdk.accel.context_projections``).

CPU, float32: after ``fuse_blocks`` a tiny SD-style UNet's cross-attentions share one projection whose
slices equal each attention's own ``context @ [W_k; W_v]^T`` (float32 summation order aside); it is
computed once per UNet call, again in the next call (a context changed in place between calls is seen), not
at all after the weights move (each attention then projects on its own); the fused model's outputs match
the unfused model's; unfusing removes it; a fused model pickles.
"""

from __future__ import annotations

import copy
import io

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.accel import fuse_blocks, fuse_model, unfuse_blocks
from ldm_sdk.accel.block_fusion import FusedCrossAttention
from ldm_sdk.accel.context_projections import ContextProjections
from ldm_sdk.benchmarks.common import randomize_
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.testing.tiny import tiny_unet


def fused_unet() -> tuple[UNetModel, UNetModel]:
    """A tiny SD-style UNet whose context (24 wide) differs from its 32 / 64 channels, cross-attention at
    both levels, random weights (proj_out not zero); and an unfused copy."""
    config = tiny_unet(
        4, 4, num_heads=2, use_spatial_transformer=True, context_dim=24, attention_resolutions=(1, 2)
    )
    unet = UNetModel.from_config(config).eval().requires_grad_(False)
    randomize_(unet, torch.Generator().manual_seed(0))
    plain = copy.deepcopy(unet)
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    return unet, plain


def inputs(unet: UNetModel, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.in_channels, 16, 16, generator=g)
    t = torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 7, 24, generator=g)
    return x, t, ctx


def cross_attentions(unet: UNetModel) -> list[FusedCrossAttention]:
    return [m for m in unet.modules() if isinstance(m, FusedCrossAttention) and m.context_projections]


def test_one_shared_projection_with_each_attentions_columns() -> None:
    unet, _ = fused_unet()
    attns = cross_attentions(unet)
    assert len(attns) >= 2
    shared = attns[0].context_projections
    assert isinstance(shared, ContextProjections) and all(a.context_projections is shared for a in attns)
    assert [a.context_index for a in attns] == list(range(len(attns)))
    _, _, ctx = inputs(unet)
    shared.new_call()
    for attn in attns:
        kv = shared.kv(attn.context_index, ctx)
        assert kv is not None
        own = F.linear(ctx, torch.cat([attn.to_k.weight, attn.to_v.weight]))
        torch.testing.assert_close(kv, own, rtol=1e-5, atol=1e-6)
    # one product per call: every slice is a view of the same result
    first = shared.kv(0, ctx)
    assert (
        first is not None
        and shared.kv(1, ctx).untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    )  # type: ignore[union-attr]


def test_fused_unet_matches_and_sees_a_context_changed_in_place() -> None:
    unet, plain = fused_unet()
    x, t, ctx = inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), plain(x, t, ctx), rtol=2e-5, atol=2e-5)
        ctx.mul_(-0.5)  # the same tensor, new values: a new call projects it again
        torch.testing.assert_close(unet(x, t, ctx), plain(x, t, ctx), rtol=2e-5, atol=2e-5)


def test_moved_weights_fall_back_to_each_attentions_own_gemm() -> None:
    unet, plain = fused_unet()
    attns = cross_attentions(unet)
    shared = attns[0].context_projections
    assert shared is not None
    attns[0].to_k.weight.data = attns[0].to_k.weight.detach().clone()  # new storage
    x, t, ctx = inputs(unet, seed=1)
    shared.new_call()
    assert shared.kv(0, ctx) is None
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), plain(x, t, ctx), rtol=2e-5, atol=2e-5)


def test_unfuse_removes_it_and_a_fused_model_pickles() -> None:
    unet, plain = fused_unet()
    x, t, ctx = inputs(unet, seed=2)
    with torch.no_grad():
        unet(x, t, ctx)  # leaves a remembered result behind
    buffer = io.BytesIO()
    torch.save(unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, ctx), plain(x, t, ctx), rtol=2e-5, atol=2e-5)
    unfuse_blocks(unet)
    assert "_context_projections_hook" not in unet.__dict__ and not unet._forward_pre_hooks
    assert not any("context_projections" in m.__dict__ for m in unet.modules())
