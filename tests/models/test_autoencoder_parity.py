"""Parity of our first stages with diffusers on the same random weights (fp32, CPU, width-shrunk zoo configs).

Our state dict is written in the CompVis layout of a full LDM checkpoint (``first_stage_model.`` prefix) and
converted by diffusers' own single-file converter (``convert_ldm_vae_checkpoint`` with the config from
``create_vae_diffusers_config_from_ldm``), then loaded strictly into diffusers' ``AutoencoderKL`` /
``VQModel``. diffusers has no LDM converter for VQ models, but its VAE converter maps everything except the
codebook, and the codebook key ``quantize.embedding.weight`` has the same name in both libraries: the test
adds that one key by hand.

Relative error is ``max|ours - theirs| / max|theirs|`` over the whole tensor; the bound is 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from ldm_sdk.models.configs import AutoencoderKLConfig, VQModelConfig  # noqa: E402
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel  # noqa: E402
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO  # noqa: E402

RTOL = 1e-5
WIDTH = 32  # zoo configs use ch=128; 32 keeps every level a multiple of the 32 GroupNorm groups
N_EMBED = 64


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def shrink(name: str) -> AutoencoderKLConfig | VQModelConfig:
    cfg = FIRST_STAGE_ZOO[name]
    dd = cfg.ddconfig.model_copy(update={"ch": WIDTH})
    if isinstance(cfg, VQModelConfig):
        return cfg.model_copy(update={"ddconfig": dd, "n_embed": N_EMBED})
    return cfg.model_copy(update={"ddconfig": dd})


@torch.no_grad()
def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Perturb every parameter (norm scales/shifts included) so no layer is an identity or a default."""
    for name, p in model.named_parameters():
        if name.endswith("embedding.weight"):
            p.copy_(torch.randn(p.shape, generator=gen))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        else:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def original_config(cfg: AutoencoderKLConfig | VQModelConfig) -> dict[str, object]:
    """The parts of an original LDM YAML that diffusers' converter reads."""
    params = {
        "embed_dim": cfg.embed_dim,
        "ddconfig": {**cfg.ddconfig.model_dump(), "ch_mult": list(cfg.ddconfig.ch_mult)},
    }
    return {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": {"params": params}}}}


def to_diffusers(
    ours: nn.Module, cfg: AutoencoderKLConfig | VQModelConfig
) -> tuple[dict[str, object], dict[str, Tensor]]:
    ckpt = {f"first_stage_model.{k}": v.clone() for k, v in ours.state_dict().items()}
    dconf = sfu.create_vae_diffusers_config_from_ldm(original_config(cfg), ckpt)
    sd = sfu.convert_ldm_vae_checkpoint(ckpt, dconf)
    return dconf, sd


@pytest.mark.parametrize("name", ["kl-f4", "kl-f8"])
def test_kl_matches_diffusers(name: str) -> None:
    cfg = shrink(name)
    assert isinstance(cfg, AutoencoderKLConfig)
    ours = AutoencoderKL.from_config(cfg).eval()
    randomize(ours, torch.Generator().manual_seed(1))
    dconf, sd = to_diffusers(ours, cfg)
    theirs = diffusers.AutoencoderKL(**dconf).eval()
    theirs.load_state_dict(sd, strict=True)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ours.encode(x)
        their_post = theirs.encode(x).latent_dist
        assert post.mean.shape == (
            2,
            cfg.embed_dim,
            32 // ours.downsampling_factor,
            32 // ours.downsampling_factor,
        )
        assert rel_err(post.mean, their_post.mean) <= RTOL
        assert rel_err(post.logvar, their_post.logvar) <= RTOL
        z = post.mode()
        dec, their_dec = ours.decode(z), theirs.decode(z).sample
    assert dec.shape == x.shape
    assert rel_err(dec, their_dec) <= RTOL


def test_vq_matches_diffusers() -> None:
    cfg = shrink("vq-f4")
    assert isinstance(cfg, VQModelConfig)
    ours = VQModel.from_config(cfg).eval()
    randomize(ours, torch.Generator().manual_seed(3))
    dconf, sd = to_diffusers(ours, cfg)
    assert "quantize.embedding.weight" not in sd  # the VAE converter does not know the codebook ...
    sd["quantize.embedding.weight"] = ours.state_dict()["quantize.embedding.weight"].clone()  # ... same name
    dconf.pop("scaling_factor")
    theirs = diffusers.VQModel(
        **dconf, num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim, scaling_factor=1.0
    ).eval()
    theirs.load_state_dict(sd, strict=True)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h, their_h = ours.encode(x), theirs.encode(x).latents
        assert h.shape == (2, cfg.embed_dim, 8, 8)
        assert rel_err(h, their_h) <= RTOL
        # our quantizer and theirs must pick the same codes (theirs uses cdist, ours the expanded form)
        _, _, (_, _, idx) = ours.quantize(h)
        _, _, (_, _, their_idx) = theirs.quantize(h)
        assert torch.equal(idx.reshape(-1), their_idx.reshape(-1))
        assert idx.unique().numel() > 4  # many codes in use, so the comparison means something
        for force in (False, True):
            dec = ours.decode(h, force_not_quantize=force)
            their_dec = theirs.decode(h, force_not_quantize=force).sample
            assert rel_err(dec, their_dec) <= RTOL
        quantized, raw = ours.decode(h), ours.decode(h, force_not_quantize=True)
    assert rel_err(quantized, raw) > 1e-3  # quantisation actually changed the latent
