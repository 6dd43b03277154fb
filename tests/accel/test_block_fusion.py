"""The block pass (``ldm_sdk.accel.block_fusion``): conv biases, the timestep embedding and residual adds
folded into the norms and one epilogue kernel, and the transformer projections as GEMMs on channels_last.

CPU (reference backend; the kernels themselves are tested in ``test_triton_kernels.py`` /
``test_residual_kernels.py``):

* on every tiny family, both memory formats, float32: the block-fused model equals the norm-fused model (the
  unfused model's bit-identical twin) within float32 evaluation-order noise -- the independent reference is
  the unfused eager model;
* under the Triton interpreter the whole tiny SD-1 bundle (UNet, encode, decode; channels_last) runs
  through the real kernels (a subprocess, ``TRITON_INTERPRET=1``) and matches the reference backend;
* which blocks qualify (the report, with reasons for the others), state dicts untouched, training mode and
  unfused norms take the original forward, fusing twice is a no-op, ``unfuse_model`` restores the classes;
* bf16 on the CPU: the block-fused model is no less accurate against float32 than the unfused one.

GPU (mark ``gpu``): the SD-1.5 UNet and the kl-f8 VAE decode after ``prepare_cuda_inference`` in fp16 are no
less accurate against eager float32 than the unfused fp16 models, and replay from a CUDA graph.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.accel import fuse_blocks, fuse_model, unfuse_model
from ldm_sdk.accel.block_fusion import (
    FusedResBlock,
    FusedResnetBlock,
    FusedSpatialTransformer,
    FusedTransformerBlock,
)
from ldm_sdk.accel.conv_bias import FusedBiasedConv2d
from ldm_sdk.accel.fused_unet import FusedUNetModel
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.nearest_upsample import FusedUNetUpsample
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample
from ldm_sdk.accel.thin_conv import FusedThinConv2d
from ldm_sdk.accel.vae_attention import FusedAttnBlock
from ldm_sdk.benchmarks.common import randomize_ as bench_randomize_
from ldm_sdk.benchmarks.common import true_float32
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from ldm_sdk.models import autoencoder
from ldm_sdk.models import unet as unet_module
from ldm_sdk.models.attention import BasicTransformerBlock, SpatialTransformer
from ldm_sdk.models.autoencoder import ResnetBlock
from ldm_sdk.models.configs import UNetConfig
from ldm_sdk.models.unet import ResBlock, UNetModel
from ldm_sdk.testing.interpreter import run_interpreted
from ldm_sdk.testing.tiny import ALL, SD1, random_bundle

ROOT = Path(__file__).resolve().parents[2]
FUSED_CLASSES = (
    FusedUNetModel,
    FusedResBlock,
    FusedResnetBlock,
    FusedTransformerBlock,
    FusedSpatialTransformer,
    FusedFirstStageUpsample,
    FusedUNetUpsample,
    FusedAttnBlock,
    FusedThinConv2d,
    FusedBiasedConv2d,
)


def network_outputs(
    bundle: ModelBundle, channels_last: bool, seed: int = 2, image_px: int = 32
) -> dict[str, Tensor]:
    """UNet call, first-stage encode and decode on fixed inputs, in the asked memory format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bundle.to(memory_format=fmt)
    g = torch.Generator().manual_seed(seed)
    dtype = next(bundle.first_stage_model.parameters()).dtype
    image = (
        (torch.rand(2, 3, image_px, image_px, generator=g) * 2 - 1).to(dtype).contiguous(memory_format=fmt)
    )
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        z = bundle.encode_first_stage(image)
        out["encode"] = z
        out["decode"] = bundle.decode_first_stage(z.contiguous(memory_format=fmt))
        if bundle.model is not None:
            unet = bundle.unet
            x = torch.randn(2, bundle.latent_channels, 16, 16, generator=g).contiguous(memory_format=fmt)
            t = torch.rand(2, generator=g, dtype=torch.float64) * 999
            parts: dict[str, Tensor] = {}
            if bundle.conditioning_key in ("crossattn", "hybrid"):
                width = bundle.config.unet.context_dim if bundle.config.unet is not None else None
                assert isinstance(width, int)
                parts["crossattn"] = torch.randn(2, 5, width, generator=g).to(dtype)
            if bundle.conditioning_key in ("concat", "hybrid"):
                extra = unet.in_channels - bundle.latent_channels
                concat = torch.randn(2, extra, 16, 16, generator=g).to(dtype)
                parts["concat"] = concat.contiguous(memory_format=fmt)
            out["unet"] = bundle.apply_model(x, t, Conditioning(**parts))
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def count(module: nn.Module, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def fully_fused(bundle: ModelBundle, backend: str = "reference") -> ModelBundle:
    fuse_model(bundle, backend=backend)  # type: ignore[arg-type]
    fuse_blocks(bundle, backend=backend)  # type: ignore[arg-type]
    return bundle


# -- float32 on the CPU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(ALL))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_block_fused_model_matches_the_unfused_one_in_float32(family: str, channels_last: bool) -> None:
    bundle = random_bundle(ALL[family]).eval()
    before = network_outputs(bundle, channels_last)
    fully_fused(bundle)
    assert count(bundle, FUSED_CLASSES) > 0
    after = network_outputs(bundle, channels_last)
    for name, value in before.items():
        assert after[name].shape == value.shape
        err = rel_err(after[name], value)
        # float32 evaluation order only: bias added after the conv, sums formed in another order
        assert err < 2e-5, f"{family} {name} {'channels_last' if channels_last else 'nchw'}: {err:.3e}"
        if channels_last and name != "unet" and value.dim() == 4:
            assert after[name].is_contiguous(memory_format=torch.channels_last) or value.shape[1] == 1


def test_report_counts_and_reasons() -> None:
    bundle = random_bundle(SD1).eval()
    unet_blocks = count(bundle.unet, ResBlock)
    vae_blocks = count(bundle.first_stage_model, ResnetBlock)
    transformers = count(bundle, BasicTransformerBlock)
    spatial = count(bundle, SpatialTransformer)
    vae_up = sum(type(m) is autoencoder.Upsample and m.with_conv for m in bundle.modules())
    unet_up = count(bundle, unet_module.Upsample)
    vae_attn = count(bundle, autoencoder.AttnBlock)
    # 3x3 convolutions with at most 8 outputs: the UNet's conv_out, the encoder's and the decoder's
    thin = sum(
        type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.out_channels <= 8 for m in bundle.modules()
    )
    assert vae_up > 0 and unet_up > 0 and vae_attn == 2 and thin == 3
    # convolutions run through their own forward: the UNet's conv_in, down- and upsampling convs, the
    # decoder's conv_in (the encoder's conv_in is not on the sampling path)
    unet_down = sum(isinstance(m, unet_module.Downsample) and m.use_conv for m in bundle.modules())
    biased = 1 + unet_down + unet_up + 1
    assert unet_down > 0
    not_yet = fuse_blocks(bundle)
    # residual blocks need their norms fused first; the other blocks do not
    # (the UNet itself: its skip concatenations)
    assert (
        not_yet.total
        == transformers + spatial + 2 * transformers + vae_up + unet_up + vae_attn + thin + 1 + biased
    )
    assert not_yet.fused["UNetUpsample"] == unet_up
    assert sum("not fused with their SiLU" in why for why in not_yet.skipped) == unet_blocks + vae_blocks
    unfuse_model(bundle)
    assert count(bundle, FUSED_CLASSES) == 0
    fuse_model(bundle)
    report = fuse_blocks(bundle)
    assert report.fused == {
        "ResBlock": unet_blocks,
        "ResnetBlock": vae_blocks,
        "TransformerBlock": transformers,
        "SpatialTransformer": spatial,
        "CrossAttention": 2 * transformers,
        "FirstStageUpsample": vae_up,
        "UNetUpsample": unet_up,
        "AttnBlock": vae_attn,
        "ThinConv2d": thin,
        "UNetModel": 1,
        "BiasedConv2d": biased,
    }, report
    assert report.shared_embedding == unet_blocks
    assert report.skipped == () and "fused blocks" in str(report)
    again = fuse_blocks(bundle, backend="reference")
    assert again.total == 0 and again.already_fused == sum(report.fused.values())
    fused_blocks = [m for m in bundle.modules() if isinstance(m, FUSED_CLASSES)]
    assert all(getattr(m, "fusion_backend", None) == "reference" for m in fused_blocks)


def test_scale_shift_norm_blocks_and_linear_transformers_are_left_alone() -> None:
    unet = UNetModel.from_config(
        UNetConfig(
            image_size=8,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[2],
            num_res_blocks=1,
            channel_mult=[1, 2],
            num_head_channels=16,
            use_scale_shift_norm=True,
            use_spatial_transformer=True,
            context_dim=16,
            use_linear_in_transformer=True,
        )
    ).eval()
    fuse_model(unet)
    report = fuse_blocks(unet)
    assert "ResBlock" not in report.fused and "SpatialTransformer" not in report.fused
    assert any("use_scale_shift_norm" in why for why in report.skipped)
    assert any("use_linear" in why for why in report.skipped)


def test_state_dict_training_mode_and_unfuse() -> None:
    bundle = random_bundle(SD1).eval()
    state = {k: v.clone() for k, v in bundle.state_dict().items()}
    params = list(bundle.parameters())
    fully_fused(bundle)
    assert list(bundle.state_dict()) == list(state)
    assert all(a is b for a, b in zip(bundle.parameters(), params, strict=True))
    bundle.load_state_dict(state, strict=True)
    # training mode: the original forwards run, so dropout and autograd behave as before
    trained = copy.deepcopy(bundle).train()
    plain = copy.deepcopy(bundle)
    unfuse_model(plain)
    plain.train()
    assert count(plain, FUSED_CLASSES) == 0
    unet, unet_plain = trained.unet, plain.unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    width = bundle.config.unet.context_dim if bundle.config.unet is not None else None
    assert isinstance(width, int)
    ctx = torch.randn(2, 5, width, generator=g)
    torch.manual_seed(0)
    a = unet(x, t, context=ctx)
    torch.manual_seed(0)
    b = unet_plain(x, t, context=ctx)
    assert torch.equal(a, b)
    # norms unfused behind a fused block's back: the block takes the original path
    restored = unfuse_model(bundle)
    assert restored > 0 and count(bundle, FUSED_CLASSES) == 0
    assert all(type(m) is ResBlock for m in bundle.modules() if isinstance(m, ResBlock))


def test_eval_transformer_block_stays_differentiable() -> None:
    """The fused feed-forward accumulates into the residual stream in place; with gradients on (an eval
    model under gradient guidance, say) that stays differentiable and the gradients equal the unfused
    block's."""
    g = torch.Generator().manual_seed(4)
    plain = BasicTransformerBlock(16, n_heads=2, d_head=8, context_dim=12, checkpoint=False).eval()
    bench_randomize_(plain, g)
    fused = copy.deepcopy(plain)
    fuse_blocks(fused, backend="reference")
    assert type(fused) is FusedTransformerBlock
    x = torch.randn(2, 6, 16, generator=g)
    ctx = torch.randn(2, 5, 12, generator=g)
    grads = []
    for block in (plain, fused):
        xi = x.clone().requires_grad_(True)
        out = block(xi, context=ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad))
    assert rel_err(grads[1][0], grads[0][0]) < 2e-6
    assert rel_err(grads[1][1], grads[0][1]) < 2e-5
    with torch.no_grad():
        assert rel_err(fused(x, context=ctx), grads[0][0]) < 2e-6


def test_attention_projections_share_one_storage(tmp_path: Path) -> None:
    from ldm_sdk.accel.block_fusion import FusedCrossAttention, _stacked
    from ldm_sdk.checkpoints.loader import load, save

    bundle = random_bundle(SD1).eval()
    state = {k: v.clone() for k, v in bundle.state_dict().items()}
    before = network_outputs(bundle, channels_last=False)
    fully_fused(bundle)
    attentions = [m for m in bundle.modules() if isinstance(m, FusedCrossAttention)]
    assert attentions
    for attn in attentions:
        self_attn = attn.to_q.in_features == attn.to_k.in_features
        stacked = _stacked(attn.to_q, attn.to_k, attn.to_v) if self_attn else _stacked(attn.to_k, attn.to_v)
        assert stacked is not None
        ref = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight][0 if self_attn else 1 :]
        assert torch.equal(stacked, torch.cat([w.detach() for w in ref]))
    for key, value in bundle.state_dict().items():  # same values, same keys
        assert torch.equal(value, state[key]), key
    # loading in place writes through the views into the stacked storage
    attn = attentions[0]
    new_state = {k: v.clone() for k, v in state.items()}
    name = next(k for k, v in bundle.state_dict().items() if v.data_ptr() == attn.to_k.weight.data_ptr())
    new_state[name] = torch.randn_like(new_state[name])
    bundle.load_state_dict(new_state)
    stacked = _stacked(attn.to_k, attn.to_v)
    assert stacked is not None
    assert torch.equal(stacked[: attn.to_k.out_features], new_state[name])
    bundle.load_state_dict(state)
    after = network_outputs(bundle, channels_last=False)
    for name_, value in before.items():
        assert rel_err(after[name_], value) < 2e-5, name_
    # saving copies the views out; the file loads as the original weights
    path = save(bundle, tmp_path / "fused.safetensors")
    reloaded = load(path)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    # new storage for a projection (module.to, assignment): the separate GEMMs run, the output is the same
    attn.to_k.weight.data = attn.to_k.weight.detach().clone()
    assert _stacked(attn.to_q, attn.to_k, attn.to_v) is None and _stacked(attn.to_k, attn.to_v) is None
    again = network_outputs(bundle, channels_last=False)
    for name_, value in before.items():
        assert rel_err(again[name_], value) < 2e-5, name_


def test_bf16_block_fused_model_is_no_less_accurate_on_cpu() -> None:
    bundle = random_bundle(SD1).eval()
    reference = network_outputs(bundle, channels_last=True)
    low = copy.deepcopy(bundle).to(torch.bfloat16)
    unfused = network_outputs(low, channels_last=True)
    fully_fused(low, backend="auto")
    fused = network_outputs(low, channels_last=True)
    for name, ref in reference.items():
        err_unfused, err_fused = rel_err(unfused[name], ref), rel_err(fused[name], ref)
        assert err_fused <= 1.2 * err_unfused + 1e-3, (
            f"{name}: fused {err_fused:.3e}, unfused {err_unfused:.3e}"
        )


# -- the real kernels through the Triton interpreter ---------------------------------------------------------
def interpreter_check() -> dict[str, float]:
    """Tiny SD-1 bundle, float32, channels_last (the layout of the CUDA fast path; the kernels' NCHW paths
    are covered op by op, and the interpreter runs their many small programs slowly): Triton backend
    (interpreted) vs reference."""
    bundle = random_bundle(SD1).eval()
    ref = network_outputs(fully_fused(copy.deepcopy(bundle), "reference"), True, image_px=16)
    got = network_outputs(fully_fused(bundle, "triton"), True, image_px=16)
    return {name: rel_err(got[name], value) for name, value in ref.items()}


def test_block_fusion_kernels_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    errors = run_interpreted(__file__)
    assert set(errors) == {"encode", "decode", "unet"}
    for name, err in errors.items():
        assert err < 2e-5, f"{name}: Triton (interpreted) vs reference {err:.3e}"


# -- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_sd15_unet_prepared_fp16_accuracy_and_capture() -> None:
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from tests.accel.capture_checks import sd15_pair  # here: the interpreter subprocess runs this file

    pair = sd15_pair("cuda")
    unet16, x, t, ctx, ref, unfused = pair.unet, pair.x, pair.t, pair.ctx, pair.ref, pair.unfused
    with torch.inference_mode():
        report = prepare_cuda_inference(unet16)
        assert report is not None
        assert report.blocks.fused == {
            "ResBlock": 22,
            "TransformerBlock": 16,
            "SpatialTransformer": 16,
            "CrossAttention": 32,
            "UNetUpsample": 3,
            "ThinConv2d": 1,  # conv_out
            "UNetModel": 1,  # its skip concatenations
            "BiasedConv2d": 7,  # conv_in, 3 downsampling and 3 upsampling convolutions
        }
        assert report.blocks.shared_embedding == 22
        fast = unet16(x.contiguous(memory_format=torch.channels_last), t, context=ctx.half())
        err_unfused, err_fast = rel_err(unfused, ref), rel_err(fast, ref)
        print(f"SD-1.5 UNet fp16 vs fp32: unfused {err_unfused:.3e}, prepared {err_fast:.3e}")
        assert torch.isfinite(fast).all()
        assert err_fast <= 1.2 * err_unfused + 1e-4, f"prepared {err_fast:.3e} vs unfused {err_unfused:.3e}"
        captured = CapturedModel(bind_unet(unet16, "crossattn"), mode="graph", modules=[unet16])
        replay = captured(x, t, Conditioning(crossattn=ctx.half()))
        assert rel_err(replay, fast) <= 1e-3


@pytest.mark.gpu
def test_vae_decode_prepared_fp16() -> None:
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

    with torch.device("meta"):
        vae32 = AutoencoderKL.from_config(FIRST_STAGE_ZOO["kl-f8"])  # type: ignore[arg-type]
    vae32 = vae32.to_empty(device="cuda").eval().requires_grad_(False)
    bench_randomize_(vae32, torch.Generator("cuda").manual_seed(3))
    vae16 = copy.deepcopy(vae32).half()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator(device="cuda").manual_seed(4), device="cuda")
    with torch.inference_mode():
        with true_float32():
            ref = vae32.decode(z)
        del vae32
        unfused = vae16.decode(z.half())
        report = prepare_cuda_inference(vae16)
        assert report is not None and report.blocks.fused["ResnetBlock"] == count(vae16, ResnetBlock)
        fast = vae16.decode(z.half().contiguous(memory_format=torch.channels_last))
        err_unfused, err_fast = rel_err(unfused, ref), rel_err(fast, ref)
        print(f"kl-f8 decode fp16: unfused {err_unfused:.3e}, prepared {err_fast:.3e}")
        assert torch.isfinite(fast).all()
        assert err_fast <= 1.2 * err_unfused + 1e-4, f"prepared {err_fast:.3e} vs unfused {err_unfused:.3e}"


if __name__ == "__main__":  # the interpreter subprocess of test_block_fusion_kernels_in_the_interpreter
    print(json.dumps(interpreter_check()))


def test_fused_unet_shares_the_input_of_guidance_copies() -> None:
    """The fused blocks' ``repeats`` path (channels_last, fused transformer): x once with a context of two
    copies equals x repeated, fused or not (float32 order aside)."""
    from ldm_sdk.benchmarks.common import randomize_
    from ldm_sdk.models.unet import UNetModel
    from ldm_sdk.testing.tiny import tiny_unet

    config = tiny_unet(
        4, 4, num_heads=2, use_spatial_transformer=True, context_dim=24, attention_resolutions=(1, 2)
    )
    unet = UNetModel.from_config(config).eval().requires_grad_(False)
    randomize_(unet, torch.Generator().manual_seed(0))
    unet.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(unet)
    fuse_model(fused, backend="reference")
    fuse_blocks(fused, backend="reference")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([5.0, 900.0]), torch.randn(4, 7, 24, generator=g)
    with torch.no_grad():
        shared = fused(x, t, ctx)
        repeated = fused(torch.cat([x, x]), torch.cat([t, t]), ctx)
        plain = unet(torch.cat([x, x]), torch.cat([t, t]), ctx)
    assert rel_err(shared, repeated) < 2e-5 and rel_err(shared, plain) < 2e-5
