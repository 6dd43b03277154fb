"""Parity of ``UNetModel`` with diffusers' ``UNet2DConditionModel`` on the same random weights.

Each case is a width-shrunk copy of a real Stable Diffusion YAML (same structural switches, tiny widths).
Our model is built from the YAML ``unet_config.params``, every parameter is randomised (zero-initialised
convs and norms too), its state dict is placed under ``model.diffusion_model.`` like an original
checkpoint, and diffusers' own single-file converters turn config and weights into a
``UNet2DConditionModel`` loaded with strict key matching. Outputs must agree in fp32 to a max relative
error ``max|ours - diffusers| / max|diffusers| <= 1e-5``.

The real-size checks build the actual SD 1.x / 2.x UNets on the meta device and compare parameter counts
with diffusers' model built from the converted real config.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from ldm_sdk.models.configs import UNetConfig
from ldm_sdk.models.unet import UNetModel

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import UNet2DConditionModel  # noqa: E402

MAX_REL_ERR = 1e-5

# Width-shrunk SD YAMLs. v1-inference.yaml: num_heads 8, legacy False, attention at ds 4/2/1 of mult
# (1,2,4,4) -> here ds 2/1 of (1,2,2): two cross-attention levels and a plain bottom level, as in SD.
SD1_TINY: dict[str, Any] = {
    "image_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2],
    "num_heads": 4,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 24,
    "use_checkpoint": True,
    "legacy": False,
}
# v2-inference(-v).yaml: num_head_channels 64, linear proj_in/out, no num_heads key. (v-prediction is a
# property of the diffusion wrapper, not of the UNet: the network is the same.)
SD2_TINY: dict[str, Any] = {
    "use_checkpoint": True,
    "use_fp16": False,
    "image_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2, 1],
    "num_res_blocks": 1,
    "channel_mult": [1, 2, 2],
    "num_head_channels": 8,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 40,
    "legacy": False,
}
# v1-inpainting-inference.yaml: SD1 with 9 input channels (4 noisy latent + 1 mask + 4 masked-image latent).
SD1_INPAINT_TINY: dict[str, Any] = {**SD1_TINY, "in_channels": 9, "channel_mult": [1, 2], "image_size": 32}


def original_config(unet_params: dict[str, Any]) -> dict[str, Any]:
    """The YAML shape diffusers' converters read (first stage: the SD f=8 autoencoder's ch_mult)."""
    return {
        "model": {
            "params": {
                "unet_config": {"params": unet_params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter non-trivial random values (zero-init convs and norm affines included)."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.2 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / math.sqrt(p[0].numel()))
                else:
                    p.copy_(0.2 * noise)


def to_diffusers(ours: UNetModel, unet_params: dict[str, Any]) -> UNet2DConditionModel:
    ckpt = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    orig = original_config(unet_params)
    config = single_file_utils.create_unet_diffusers_config_from_ldm(orig, ckpt)
    converted = single_file_utils.convert_ldm_unet_checkpoint(ckpt, config)
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(converted, strict=True)
    assert len(converted) == len(ours.state_dict())
    return theirs.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    ("unet_params", "size"),
    [(SD1_TINY, 16), (SD2_TINY, 16), (SD1_INPAINT_TINY, 32)],
    ids=["sd1", "sd2-linear", "sd1-inpaint"],
)
def test_matches_diffusers(unet_params: dict[str, Any], size: int) -> None:
    gen = torch.Generator().manual_seed(1234)
    ours = UNetModel.from_config(UNetConfig(**unet_params))
    randomize_(ours, gen)
    ours.eval()
    theirs = to_diffusers(ours, unet_params)

    cfg = UNetConfig(**unet_params)
    x = torch.randn(2, cfg.in_channels, size, size, generator=gen)
    context = torch.randn(2, 7, unet_params["context_dim"], generator=gen)
    for t in ([999.0, 0.0], [1.5, 500.25], [10.0, 10.0]):
        timesteps = torch.tensor(t)
        with torch.no_grad():
            a = ours(x, timesteps, context=context)
            b = theirs(x, timesteps, encoder_hidden_states=context).sample
        assert a.shape == (2, cfg.out_channels, size, size)
        assert b.abs().max() > 1e-2  # nothing trivially zero
        err = rel_err(a, b)
        assert err <= MAX_REL_ERR, f"t={t}: max relative error {err:.3e} > {MAX_REL_ERR:.0e}"
    # Timestep and context both reach the output (so the comparison covers their paths).
    with torch.no_grad():
        assert rel_err(ours(x, timesteps + 7.0, context=context), a) > 1e-3
        assert rel_err(ours(x, timesteps, context=context + 1.0), a) > 1e-3


def test_parity_detects_a_wrong_weight() -> None:
    """The comparison above can fail: perturbing one attention weight breaks parity."""
    gen = torch.Generator().manual_seed(0)
    ours = UNetModel.from_config(UNetConfig(**SD1_TINY))
    randomize_(ours, gen)
    ours.eval()
    theirs = to_diffusers(ours, SD1_TINY)
    with torch.no_grad():
        ours.middle_block[1].transformer_blocks[0].attn2.to_k.weight.mul_(1.01)
        x = torch.randn(1, 4, 16, 16, generator=gen)
        ctx = torch.randn(1, 7, 24, generator=gen)
        t = torch.tensor([3.0])
        assert rel_err(ours(x, t, context=ctx), theirs(x, t, encoder_hidden_states=ctx).sample) > MAX_REL_ERR


# The real Stable Diffusion UNets (configs as in v1-inference.yaml / v2-inference.yaml).
SD1_REAL: dict[str, Any] = {
    **SD1_TINY,
    "image_size": 32,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "context_dim": 768,
}
SD2_REAL: dict[str, Any] = {
    **SD2_TINY,
    "image_size": 32,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "context_dim": 1024,
}


@pytest.mark.parametrize(
    ("unet_params", "expected"),
    [(SD1_REAL, 859_520_964), (SD2_REAL, 865_910_724)],
    ids=["sd1", "sd2"],
)
def test_real_size_parameter_count(unet_params: dict[str, Any], expected: int) -> None:
    with torch.device("meta"):
        ours = UNetModel.from_config(UNetConfig(**unet_params))
        ckpt = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
        config = single_file_utils.create_unet_diffusers_config_from_ldm(original_config(unet_params), ckpt)
        theirs = UNet2DConditionModel(**config)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_ours == n_theirs == expected
    # Same tensors, by diffusers' own key map: every key converts and every converted shape matches.
    converted = single_file_utils.convert_ldm_unet_checkpoint(ckpt, config)
    theirs_sd = theirs.state_dict()
    assert converted.keys() == theirs_sd.keys()
    assert all(converted[k].shape == theirs_sd[k].shape for k in converted)

    sd = ours.state_dict()
    ctx = unet_params["context_dim"]
    proj_in = (320, 320) if unet_params.get("use_linear_in_transformer") else (320, 320, 1, 1)
    for key, shape in {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.1.proj_in.weight": proj_in,
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, ctx),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.norm3.weight": (320,),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape))
