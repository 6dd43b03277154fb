"""Unit tests of the UNet and its parts against independent references written out here.

References are the original math (einsum softmax attention, closed-form sinusoids), not calls into
``ldm_sdk``; key names are those of real CompVis / LDM-zoo checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_sdk.models.attention import CrossAttention, SpatialTransformer
from ldm_sdk.models.configs import UNetConfig
from ldm_sdk.models.embeddings import GroupNorm32, checkpoint, timestep_embedding
from ldm_sdk.models.unet import AttentionBlock, ResBlock, UNetModel, Upsample

# LDM-zoo ADM-style class-conditional UNet (cin: num_classes, AttentionBlock, scale-shift norm,
# resampling ResBlocks, num_head_channels 32), shrunk.
CLASS_COND: dict[str, Any] = {
    "image_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_classes": 5,
    "num_head_channels": 32,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}
# Unconditional LDM-zoo UNet (celebahq/ffhq/lsun style: num_heads given, legacy default), with pooling /
# conv-less resampling, separate upsampling head count and a codebook-id head.
UNCOND: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2],
    "num_heads": 2,
    "num_heads_upsample": 1,
    "conv_resample": False,
}
SD_TINY: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "context_dim": 16,
    "legacy": False,
}


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere, zero-initialised output projections included."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.ndim >= 2 else 1.0 + 0.2 * noise)


def build(params: dict[str, Any], **overrides: Any) -> UNetModel:
    model = UNetModel.from_config(UNetConfig(**{**params, **overrides}))
    randomize_(model)
    return model.eval()


# --- whole UNets -------------------------------------------------------------------------------------


def test_class_conditional_unet_shapes_and_keys() -> None:
    model = build(CLASS_COND)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([3, 700]), y=torch.tensor([0, 4]))
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float32
    # Labels change the result.
    assert not torch.allclose(out, model(x, torch.tensor([3, 700]), y=torch.tensor([1, 4])))

    sd = model.state_dict()
    expected = {
        "label_emb.weight": (5, 128),
        "time_embed.0.weight": (128, 32),
        "input_blocks.0.0.weight": (32, 3, 3, 3),
        "input_blocks.1.1.qkv.weight": (96, 32, 1),
        "input_blocks.1.1.proj_out.weight": (32, 32, 1),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),  # scale and shift: 2 * out_channels
        "input_blocks.2.0.in_layers.2.weight": (32, 32, 3, 3),  # down-sampling ResBlock
        "input_blocks.3.0.skip_connection.weight": (64, 32, 1, 1),
        "middle_block.1.norm.weight": (64,),
        "output_blocks.1.2.out_layers.3.weight": (64, 64, 3, 3),  # up-sampling ResBlock after attention
        "out.2.weight": (3, 32, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(".op." in k or ".conv." in k for k in sd)  # resampling is done by ResBlocks
    assert [m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)] == [1, 2, 2, 2, 2, 1, 1]


def test_unconditional_unet_heads_pooling_and_codebook_head() -> None:
    model = build(UNCOND)
    x = torch.randn(1, 3, 8, 8)
    assert model(x, torch.tensor([5])).shape == (1, 3, 8, 8)
    sd = model.state_dict()
    assert "label_emb.weight" not in sd
    assert not any(".op." in k for k in sd)  # conv_resample=False: average pooling, no weights
    assert isinstance(model.input_blocks[3][0].op, nn.AvgPool2d)
    upsample = model.output_blocks[2][2]
    assert isinstance(upsample, Upsample) and not upsample.use_conv  # conv-less upsampling
    assert not any(".conv." in k for k in sd)
    heads = {name: m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}
    assert heads == {
        "input_blocks.4.1": 2,
        "input_blocks.5.1": 2,
        "middle_block.1": 2,
        "output_blocks.0.1": 1,  # num_heads_upsample
        "output_blocks.1.1": 1,
        "output_blocks.2.1": 1,
    }
    with_ids = build(UNCOND, n_embed=11)
    assert with_ids.state_dict()["id_predictor.1.weight"].shape == (11, 32, 1, 1)
    assert with_ids(x, torch.tensor([5])).shape == (1, 11, 8, 8)


def test_sd_style_keys_and_upsample_position() -> None:
    sd = build(SD_TINY).state_dict()
    for key in (
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.2.0.op.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "output_blocks.1.1.conv.weight",  # no attention at the bottom level: upsample is layer 1
        "output_blocks.3.1.proj_out.weight",
    ):
        assert key in sd, key
    assert sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, 16)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in sd
    with_attn_low = build(SD_TINY, attention_resolutions=[1, 2]).state_dict()
    assert "output_blocks.1.2.conv.weight" in with_attn_low  # attention there too: upsample is layer 2


def test_class_label_rules() -> None:
    cond, uncond = build(CLASS_COND), build(UNCOND)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    with pytest.raises(ValueError, match=r"class-conditional.*pass y"):
        cond(x, t)
    with pytest.raises(ValueError, match="not class-conditional"):
        uncond(x, t, y=torch.tensor([0]))


def test_invalid_inputs_and_configs() -> None:
    model = build(SD_TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 4, 9, 9), torch.tensor([1]), context=torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), context=torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="use_spatial_transformer=False"):
        UNetModel(**{**UNCOND, "context_dim": 8})
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**{**UNCOND, "num_heads": -1})


def test_fp64_matches_fp32_and_dtype_follows_parameters() -> None:
    model = build(CLASS_COND)
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([17.0, 923.5]), torch.tensor([2, 3])
    with torch.no_grad():
        out32 = model(x, t, y=y)
        model64 = model.double()
        out64 = model64(x.double(), t, y=y)
        mixed = model64(x, t, y=y)  # computes in fp64, returns the input's dtype
    assert out64.dtype == torch.float64 and mixed.dtype == torch.float32
    err = ((out32.double() - out64).abs().max() / out64.abs().max()).item()
    assert err <= 1e-5, err
    assert torch.equal(mixed, out64.float())


@pytest.mark.parametrize("params", [CLASS_COND, SD_TINY], ids=["attention-block", "spatial-transformer"])
def test_gradient_checkpointing_same_outputs_and_gradients(params: dict[str, Any]) -> None:
    plain = build(params).train()
    ckpt = build(params, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, params["in_channels"], 8, 8)
    kwargs: dict[str, Any] = {"timesteps": torch.tensor([4.0, 250.0])}
    if "num_classes" in params:
        kwargs["y"] = torch.tensor([1, 2])
    else:
        kwargs["context"] = torch.randn(2, 3, params["context_dim"])

    calls = {"n": 0}

    def count(*_: Any) -> None:
        calls["n"] += 1

    ckpt.input_blocks[1][0].in_layers.register_forward_hook(count)
    outs, grads = [], []
    for model in (plain, ckpt):
        out = model(x, **kwargs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert calls["n"] == 2  # forward + recomputation in backward: checkpointing really happened
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_helper_recomputes_only_when_enabled_with_grad() -> None:
    calls = {"n": 0}

    def fn(a: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return a.sin() * 2

    def run(enabled: bool, grad: bool) -> int:
        calls["n"] = 0
        a = torch.ones(2, requires_grad=True)
        with torch.set_grad_enabled(grad):
            out = checkpoint(fn, a, enabled=enabled)
        if grad:
            out.sum().backward()
            torch.testing.assert_close(a.grad, 2 * torch.ones(2).cos())
        return calls["n"]

    assert run(enabled=True, grad=True) == 2
    assert run(enabled=False, grad=True) == 1
    assert run(enabled=True, grad=False) == 1


# --- parts against written-out references ---------------------------------------------------------------


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 0.5, 3.0, 41.25, 999.0])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    assert emb.shape == (5, 10) and emb.dtype == torch.float32
    for r, tv in enumerate(t.tolist()):
        for i in range(half):
            w = 10000 ** (-i / half)
            assert abs(emb[r, i].item() - math.cos(tv * w)) < 2e-4
            assert abs(emb[r, half + i].item() - math.sin(tv * w)) < 2e-4
    odd = timestep_embedding(t, 11)
    assert odd.shape == (5, 11) and torch.equal(odd[:, -1], torch.zeros(5))
    assert torch.equal(odd[:, :10], emb)
    assert torch.equal(timestep_embedding(t, 3, repeat_only=True), t[:, None].repeat(1, 3))


def test_groupnorm32_computes_in_float32() -> None:
    norm = GroupNorm32(2, 4).to(torch.bfloat16)
    x = torch.randn(1, 4, 3, 3).to(torch.bfloat16)
    ref = F.group_norm(x.float(), 2, eps=1e-5).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def reference_qkv_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """Original ADM math: explicit scaled einsum + softmax over a (B, 3*H*D, T) packed qkv."""
    b, width, t = qkv.shape
    d = width // (3 * heads)
    if legacy:  # (H, 3, D) channel layout
        q, k, v = qkv.reshape(b * heads, 3 * d, t).split(d, dim=1)
    else:  # (3, H, D) channel layout
        q, k, v = (z.reshape(b * heads, d, t) for z in qkv.chunk(3, dim=1))
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, t)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new"])
def test_attention_block_matches_einsum_reference(new_order: bool) -> None:
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=new_order)
    randomize_(block)
    x = torch.randn(2, 64, 4, 5)
    with torch.no_grad():
        h = x.reshape(2, 64, 20)
        qkv = F.conv1d(
            F.group_norm(h, 32, block.norm.weight, block.norm.bias, 1e-5), block.qkv.weight, block.qkv.bias
        )
        attn = reference_qkv_attention(qkv, 4, legacy=not new_order)
        other = reference_qkv_attention(qkv, 4, legacy=new_order)
        ref = (h + F.conv1d(attn, block.proj_out.weight, block.proj_out.bias)).reshape(2, 64, 4, 5)
        wrong = (h + F.conv1d(other, block.proj_out.weight, block.proj_out.bias)).reshape(2, 64, 4, 5)
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, wrong, atol=1e-3)  # the two layouts really differ


def reference_cross_attention(attn: CrossAttention, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """CompVis math: "b n (h d) -> (b h) n d", einsum similarity * scale, softmax, back, ``to_out``."""
    h, d = attn.heads, attn.dim_head
    b = x.shape[0]
    q, k, v = x @ attn.to_q.weight.T, ctx @ attn.to_k.weight.T, ctx @ attn.to_v.weight.T
    q, k, v = (z.reshape(b, -1, h, d).permute(0, 2, 1, 3).reshape(b * h, -1, d) for z in (q, k, v))
    w = torch.softmax(torch.einsum("bid,bjd->bij", q, k) * d**-0.5, dim=-1)
    o = torch.einsum("bij,bjd->bid", w, v).reshape(b, h, -1, d).permute(0, 2, 1, 3).reshape(b, -1, h * d)
    return o @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_cross_attention_matches_einsum_reference() -> None:
    cross = CrossAttention(12, context_dim=7, heads=3, dim_head=5)
    own = CrossAttention(12, heads=2, dim_head=4)  # no context: self-attention
    randomize_(cross)
    randomize_(own, seed=1)
    x, ctx = torch.randn(2, 6, 12), torch.randn(2, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(
            cross(x, ctx), reference_cross_attention(cross, x, ctx), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(own(x), reference_cross_attention(own, x, x), rtol=1e-5, atol=1e-5)
    assert set(cross.state_dict()) == {
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
        "to_out.0.bias",
    }


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv-proj", "linear-proj"])
def test_spatial_transformer_matches_written_out_reference(use_linear: bool) -> None:
    """GroupNorm(32, eps 1e-6), proj_in, pre-LayerNorm self-attn / cross-attn / GEGLU MLP, proj_out, residual.

    The input is small (variance ~1e-6) so that the norm's eps matters.
    """
    st = SpatialTransformer(32, 2, 8, context_dim=6, use_linear=use_linear, use_checkpoint=False)
    randomize_(st)
    x, ctx = 1e-3 * torch.randn(2, 32, 3, 4), torch.randn(2, 5, 6)
    blk = st.transformer_blocks[0]

    def ln(z: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(z, (z.shape[-1],), norm.weight, norm.bias, 1e-5)

    def linear(z: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        return z @ w.T + layer.bias

    with torch.no_grad():
        h = F.group_norm(x, 32, st.norm.weight, st.norm.bias, 1e-6)
        h = h.reshape(2, 32, 12).transpose(1, 2)  # b c h w -> b (h w) c; a 1x1 conv is a linear map here
        h = linear(h, st.proj_in)
        h = reference_cross_attention(blk.attn1, ln(h, blk.norm1), ln(h, blk.norm1)) + h
        h = reference_cross_attention(blk.attn2, ln(h, blk.norm2), ctx) + h
        a, gate = linear(ln(h, blk.norm3), blk.ff.net[0].proj).chunk(2, dim=-1)
        h = linear(a * F.gelu(gate), blk.ff.net[2]) + h
        h = linear(h, st.proj_out)
        ref = h.transpose(1, 2).reshape(2, 32, 3, 4) + x
        out = st(x, ctx)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, err


def test_spatial_transformer_per_block_context_dims() -> None:
    st = SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 12], use_linear=True, use_checkpoint=False)
    sd = st.state_dict()
    assert sd["transformer_blocks.0.attn2.to_k.weight"].shape == (32, 8)
    assert sd["transformer_blocks.1.attn2.to_k.weight"].shape == (32, 12)
    assert sd["proj_in.weight"].shape == (32, 32) and sd["proj_out.weight"].shape == (32, 32)
    x = torch.randn(1, 32, 3, 3)
    assert st(x, [torch.randn(1, 5, 8), torch.randn(1, 2, 12)]).shape == (1, 32, 3, 3)
    with pytest.raises(ValueError, match="depth is 2"):
        SpatialTransformer(32, 2, 16, depth=2, context_dim=[8])


@pytest.mark.parametrize("mode", ["down", "up", "plain"])
def test_resblock_scale_shift_and_resampling_reference(mode: str) -> None:
    """ADM ResBlock: norm-SiLU, resample h and x, conv; FiLM (1 + scale, shift) after the out norm."""
    rb = ResBlock(
        32, 16, 0.0, out_channels=64, use_scale_shift_norm=True, up=mode == "up", down=mode == "down"
    )
    randomize_(rb)
    x, emb = torch.randn(2, 32, 6, 6), torch.randn(2, 16)

    def resample(z: torch.Tensor) -> torch.Tensor:
        if mode == "down":
            return F.avg_pool2d(z, 2)
        return F.interpolate(z, scale_factor=2, mode="nearest") if mode == "up" else z

    i0, i2 = rb.in_layers[0], rb.in_layers[2]
    o0, o3 = rb.out_layers[0], rb.out_layers[3]
    with torch.no_grad():
        h = resample(F.silu(F.group_norm(x, 32, i0.weight, i0.bias, 1e-5)))
        h = F.conv2d(h, i2.weight, i2.bias, padding=1)
        e = F.linear(F.silu(emb), rb.emb_layers[1].weight, rb.emb_layers[1].bias)
        scale, shift = e[:, :64, None, None], e[:, 64:, None, None]
        h = F.group_norm(h, 32, o0.weight, o0.bias, 1e-5) * (1 + scale) + shift
        h = F.conv2d(F.silu(h), o3.weight, o3.bias, padding=1)
        skip = rb.skip_connection
        ref = F.conv2d(resample(x), skip.weight, skip.bias) + h
        torch.testing.assert_close(rb(x, emb), ref, rtol=1e-5, atol=1e-5)


def test_resblock_skip_connection_kinds() -> None:
    assert isinstance(ResBlock(32, 16, 0.0).skip_connection, nn.Identity)
    assert ResBlock(32, 16, 0.0, out_channels=64, use_conv=True).skip_connection.kernel_size == (3, 3)
    assert ResBlock(32, 16, 0.0, out_channels=64).skip_connection.kernel_size == (1, 1)


# -- shared input (classifier-free guidance's two halves) ---------------------------------------------------
def _shared_input_unet(**overrides: Any) -> UNetModel:
    config = {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_heads": 2,
        "use_spatial_transformer": True,
        "context_dim": 24,
        "legacy": False,
        **overrides,
    }
    torch.manual_seed(0)
    unet = UNetModel.from_config(UNetConfig(**config)).eval()
    for module in unet.modules():  # zero-initialised output projections would hide the transformers
        for p in module.parameters(recurse=False):
            if p.ndim >= 2 and not p.any():
                nn.init.normal_(p, std=0.05)
    return unet


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_linear_in_transformer": True, "transformer_depth": 2}],
    ids=["sd1", "linear-depth2"],
)
@pytest.mark.parametrize("copies", [2, 3])
def test_a_context_of_several_copies_equals_the_repeated_batch(
    overrides: dict[str, Any], copies: int
) -> None:
    """x / t of B rows with a context of copies x B rows == the same x / t repeated (float32 order aside)."""
    unet = _shared_input_unet(**overrides)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3.0, 700.0])
    ctx = torch.randn(2 * copies, 5, 24, generator=g)
    with torch.no_grad():
        shared = unet(x, t, context=ctx)
        repeated = unet(torch.cat([x] * copies), torch.cat([t] * copies), context=ctx)
    assert shared.shape == repeated.shape == (2 * copies, 4, 8, 8)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    # the copies really differ (each sees its own context)
    assert not torch.allclose(shared[:2], shared[2:4], atol=1e-3)


def test_shared_input_runs_the_first_layers_once() -> None:
    unet = _shared_input_unet()
    batches: list[int] = []
    first_res = unet.input_blocks[1][0]
    first_res.register_forward_hook(lambda m, args, out: batches.append(out.shape[0]))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(4, 5, 24)
    with torch.no_grad():
        unet(x, torch.tensor([1.0, 2.0]), context=ctx)
    assert batches == [2]  # the first residual block saw the 2 distinct samples, not 4


def test_a_context_batch_that_is_no_multiple_is_an_error() -> None:
    unet = _shared_input_unet()
    with pytest.raises(ValueError, match="must be x's batch 2 or a multiple of it"):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), context=torch.randn(3, 5, 24))


@pytest.mark.parametrize("disable_self_attn", [False, True])
def test_spatial_transformer_repeats_equal_the_repeated_input(disable_self_attn: bool) -> None:
    torch.manual_seed(0)
    block = SpatialTransformer(32, 2, 16, depth=2, context_dim=24, disable_self_attn=disable_self_attn).eval()
    nn.init.normal_(block.proj_out.weight, std=0.05)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(4, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            block(x, ctx, repeats=2), block(torch.cat([x, x]), ctx), rtol=1e-5, atol=1e-5
        )
