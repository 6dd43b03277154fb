"""First stages: CompVis key layout of every zoo model, shapes, attention, posterior math, the quantizer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from ldm_sdk.models.autoencoder import AttnBlock, Decoder, Encoder, ResnetBlock
from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, VQModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL, DiagonalGaussianDistribution, VQModel
from ldm_sdk.models.quantize import VectorQuantizer
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO, SD_VAE

Config = AutoencoderKLConfig | VQModelConfig


def build(cfg: Config) -> AutoencoderKL | VQModel:
    return (
        AutoencoderKL.from_config(cfg) if isinstance(cfg, AutoencoderKLConfig) else VQModel.from_config(cfg)
    )


def shrink(cfg: Config) -> Config:
    """A fast copy for numeric checks: width 32 instead of 128, one ResnetBlock per level, 16 codes."""
    upd: dict[str, object] = {"ddconfig": cfg.ddconfig.model_copy(update={"ch": 32, "num_res_blocks": 1})}
    if isinstance(cfg, VQModelConfig):
        upd["n_embed"] = 16
    return cfg.model_copy(update=upd)


# -- key layout ----------------------------------------------------------------------------------------------


def _resnet(prefix: str, cin: int, cout: int) -> set[str]:
    keys = {f"{prefix}.{n}.{p}" for n in ("norm1", "conv1", "norm2", "conv2") for p in ("weight", "bias")}
    if cin != cout:
        keys |= {f"{prefix}.nin_shortcut.weight", f"{prefix}.nin_shortcut.bias"}
    return keys


def _attn(prefix: str) -> set[str]:
    return {f"{prefix}.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")}


def compvis_keys(cfg: Config) -> set[str]:
    """The state-dict keys of the original ``ldm.models.autoencoder`` model, enumerated level by level."""
    dd = cfg.ddconfig
    ch, mult, nres, attn = dd.ch, dd.ch_mult, dd.num_res_blocks, set(dd.attn_resolutions)
    has_attn = dd.attn_type == "vanilla"
    conv = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    keys = conv("encoder.conv_in") | conv("encoder.norm_out") | conv("encoder.conv_out")
    keys |= conv("decoder.conv_in") | conv("decoder.norm_out") | conv("decoder.conv_out")
    keys |= conv("quant_conv") | conv("post_quant_conv")
    res, cin = dd.resolution, ch
    for i, m in enumerate(mult):  # encoder: level i runs at resolution 256 / 2**i
        for j in range(nres):
            keys |= _resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if res in attn and has_attn:
                keys |= _attn(f"encoder.down.{i}.attn.{j}")
        if i != len(mult) - 1:
            keys |= conv(f"encoder.down.{i}.downsample.conv")
            res //= 2
    for part in ("encoder", "decoder"):
        keys |= _resnet(f"{part}.mid.block_1", cin, cin) | _resnet(f"{part}.mid.block_2", cin, cin)
        if has_attn:
            keys |= _attn(f"{part}.mid.attn_1")
    for i in reversed(range(len(mult))):  # decoder: up.i is level i, built from the bottom
        for j in range(nres + 1):
            keys |= _resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if res in attn and has_attn:
                keys |= _attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys |= conv(f"decoder.up.{i}.upsample.conv")
            res *= 2
    if isinstance(cfg, VQModelConfig):
        keys.add("quantize.embedding.weight")
    return keys


@pytest.fixture(scope="module")
def meta_state_dicts() -> dict[str, dict[str, Tensor]]:
    out = {}
    for name, cfg in FIRST_STAGE_ZOO.items():
        with torch.device("meta"):
            out[name] = build(cfg).state_dict()
    return out


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_ZOO))
def test_zoo_key_set_is_compvis(name: str, meta_state_dicts: dict[str, dict[str, Tensor]]) -> None:
    assert set(meta_state_dicts[name]) == compvis_keys(FIRST_STAGE_ZOO[name])


def test_real_key_names_and_shapes(meta_state_dicts: dict[str, dict[str, Tensor]]) -> None:
    sd = meta_state_dicts["kl-f8"]  # == the SD 1.x/2.x VAE
    assert FIRST_STAGE_ZOO["kl-f8"] is SD_VAE
    assert len(sd) == 248
    assert sum(v.numel() for v in sd.values()) == 83_653_863  # parameter count of the SD VAE
    expect = {
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(sd[k].shape) for k in expect} == expect
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert not any("temb_proj" in k for k in sd)

    vq = meta_state_dicts["vq-f8"]
    assert tuple(vq["quantize.embedding.weight"].shape) == (16384, 4)
    assert tuple(vq["encoder.down.3.attn.1.q.weight"].shape) == (512, 512, 1, 1)
    assert "decoder.up.3.attn.2.k.weight" in vq and "decoder.up.2.attn.0.k.weight" not in vq
    assert tuple(meta_state_dicts["vq-f8-n256"]["quantize.embedding.weight"].shape) == (256, 4)
    assert "encoder.down.5.attn.1.v.bias" in meta_state_dicts["kl-f32"]  # the 8x8 level of kl-f32

    noattn = meta_state_dicts["vq-f4-noattn"]
    assert not any("attn_1" in k for k in noattn)
    assert set(meta_state_dicts["vq-f4"]) - set(noattn) == _attn("encoder.mid.attn_1") | _attn(
        "decoder.mid.attn_1"
    )


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_ZOO))
def test_latent_shapes(name: str) -> None:
    cfg = FIRST_STAGE_ZOO[name]
    factor = {"f4": 4, "f8": 8, "f16": 16, "f32": 32}[name.split("-")[1]]
    model = build(shrink(cfg)).eval()
    assert model.downsampling_factor == factor
    assert model.latent_channels == cfg.embed_dim
    size = max(32, 2 * factor)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        enc = model.encode(x)
        z = enc.mode() if isinstance(enc, DiagonalGaussianDistribution) else enc
        assert z.shape == (1, cfg.embed_dim, size // factor, size // factor)
        assert model.decode(z).shape == x.shape


# -- blocks --------------------------------------------------------------------------------------------------


def test_attnblock_matches_softmax_reference() -> None:
    block = AttnBlock(32)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 32, 5, 3)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # (b, c, n)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
        ref = x + block.proj_out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))
        out = block(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_resnetblock_submodules() -> None:
    keys = set(ResnetBlock(in_channels=32, out_channels=64, temb_channels=0).state_dict())
    assert keys == {k.removeprefix("x.") for k in _resnet("x", 32, 64)}
    with_temb = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, temb_channels=16)
    assert tuple(with_temb.temb_proj.weight.shape) == (64, 16)
    assert tuple(with_temb.conv_shortcut.weight.shape) == (64, 32, 3, 3)
    out = with_temb(torch.randn(1, 32, 4, 4), torch.randn(1, 16))
    assert out.shape == (1, 64, 4, 4)


def test_decoder_pre_end_and_tanh() -> None:
    kw = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3,
              resolution=16, z_channels=4)  # fmt: skip
    torch.manual_seed(0)
    plain = Decoder(**kw)
    torch.manual_seed(0)
    tanh = Decoder(**kw, tanh_out=True)
    torch.manual_seed(0)
    pre = Decoder(**kw, give_pre_end=True)
    z = 3 * torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.allclose(tanh(z), torch.tanh(plain(z)))
        assert pre(z).shape == (1, 32, 8, 8)


def test_invalid_arguments_are_explained() -> None:
    with pytest.raises(ValueError, match="valid"):
        Encoder(ch=32, num_res_blocks=1, attn_resolutions=(), in_channels=3, resolution=16, z_channels=4,
                attn_type="linear")  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(ValueError, match="multiples of 32"):
        Encoder(ch=24, num_res_blocks=1, attn_resolutions=(), in_channels=3, resolution=16, z_channels=4)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(DDConfig(z_channels=4, double_z=False, ch=32), embed_dim=4)
    with pytest.raises(TypeError, match="VQModelConfig"):
        VQModel.from_config(FIRST_STAGE_ZOO["kl-f8"])  # type: ignore[arg-type]


# -- posterior -----------------------------------------------------------------------------------------------


def test_diagonal_gaussian_against_closed_form() -> None:
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    logvar[0, 0, 0, 0] = 50.0  # clamped to 20
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    clamped = logvar.clamp(-30, 20)
    std = torch.exp(0.5 * clamped)
    normal = torch.distributions.Normal(mean, std)
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.var, std**2)
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(normal, standard).sum((1, 2, 3)))

    other_mean, other_logvar = torch.randn(2, 3, 4, 4), 0.5 * torch.randn(2, 3, 4, 4)
    other = DiagonalGaussianDistribution(torch.cat([other_mean, other_logvar], 1))
    other_normal = torch.distributions.Normal(other_mean, torch.exp(0.5 * other_logvar))
    torch.testing.assert_close(
        post.kl(other), torch.distributions.kl_divergence(normal, other_normal).sum((1, 2, 3))
    )

    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(post.nll(x), -normal.log_prob(x).sum((1, 2, 3)))
    assert torch.equal(post.mode(), mean)

    s1 = post.sample(generator=torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s1, mean + std * eps)

    det = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
    assert torch.equal(det.sample(), mean) and torch.equal(det.kl(), torch.zeros(2))


# -- quantizer -----------------------------------------------------------------------------------------------


def _quantizer(n_e: int = 12, e_dim: int = 3, **kw: object) -> VectorQuantizer:
    vq = VectorQuantizer(n_e, e_dim, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(n_e, e_dim))
    return vq


def test_quantizer_nearest_code_and_straight_through() -> None:
    vq = _quantizer()
    z = torch.randn(2, 3, 5, 4, requires_grad=True)
    z_q, _, (perplexity, encodings, idx) = vq(z)
    assert perplexity is None and encodings is None
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1)
    assert torch.equal(idx, brute)
    assert idx.unique().numel() > 3
    torch.testing.assert_close(
        z_q.detach(), vq.embedding.weight.detach()[brute].reshape(2, 5, 4, 3).permute(0, 3, 1, 2)
    )
    torch.testing.assert_close(vq.quantize(z).detach(), z_q.detach())

    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # straight-through: d z_q / d z = identity
    assert vq.embedding.weight.grad is None  # no gradient to the codebook through z_q

    sane = _quantizer(sane_index_shape=True)
    assert sane(z.detach())[2][2].shape == (2, 5, 4)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_forms(legacy: bool) -> None:
    beta = 0.3
    vq = _quantizer(beta=beta, legacy=legacy)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, loss, (_, _, idx) = vq(z)
    e = vq.embedding.weight.detach()[idx].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    n = z.numel()
    torch.testing.assert_close(loss, (1 + beta) * ((e - z.detach()) ** 2).mean())
    loss.backward()
    # legacy: beta weights the codebook term; otherwise it weights the commitment (encoder) term
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    torch.testing.assert_close(z.grad, w_commit * 2 * (z.detach() - e) / n)
    code_grad = torch.zeros_like(vq.embedding.weight)
    code_grad.index_add_(0, idx, w_code * 2 * (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 3) / n)
    torch.testing.assert_close(vq.embedding.weight.grad, code_grad)


def _remap_quantizer(tmp_path: Path, unknown_index: object) -> tuple[VectorQuantizer, Tensor]:
    path = tmp_path / "used.npy"
    np.save(path, np.array([5, 2, 9, 0], dtype=np.int64))
    vq = _quantizer(remap=str(path), unknown_index=unknown_index)
    codes = torch.tensor([[2, 7, 0], [9, 5, 11]])  # 7 and 11 are not in `used`
    z = vq.embedding.weight.detach()[codes].reshape(2, 1, 3, 3).permute(0, 3, 1, 2)  # exact codebook vectors
    return vq, z


def test_quantizer_remap_extra_and_int(tmp_path: Path) -> None:
    vq, z = _remap_quantizer(tmp_path, "extra")
    assert vq.re_embed == 5 and torch.equal(vq.state_dict()["used"], torch.tensor([5, 2, 9, 0]))
    idx = vq(z)[2][2]
    assert idx.shape == (6, 1)
    assert idx.reshape(-1).tolist() == [1, 4, 3, 2, 0, 4]
    assert vq.unmap_to_all(idx.reshape(2, 3)).tolist() == [[2, 5, 0], [9, 5, 5]]  # extra -> used[0]
    entry = vq.get_codebook_entry(idx, (2, 1, 3, 3))
    torch.testing.assert_close(entry, vq.embedding.weight.detach()[torch.tensor([[2, 5, 0], [9, 5, 5]])]
                               .reshape(2, 1, 3, 3).permute(0, 3, 1, 2))  # fmt: skip

    vq_int, z = _remap_quantizer(tmp_path, 1)
    assert vq_int.re_embed == 4
    assert vq_int(z)[2][2].reshape(-1).tolist() == [1, 1, 3, 2, 0, 1]
    with pytest.raises(ValueError, match="valid"):
        _remap_quantizer(tmp_path, 4)


def test_quantizer_remap_random_needs_generator(tmp_path: Path) -> None:
    vq, z = _remap_quantizer(tmp_path, "random")
    with pytest.raises(ValueError, match="generator"):
        vq(z)
    a = vq(z, generator=torch.Generator().manual_seed(3))[2][2].reshape(2, 3)
    b = vq(z, generator=torch.Generator().manual_seed(3))[2][2].reshape(2, 3)
    assert torch.equal(a, b)
    assert [a[0, 0].item(), a[0, 2].item(), a[1, 0].item(), a[1, 1].item()] == [1, 3, 2, 0]  # known codes
    draws = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(3))
    assert [a[0, 1].item(), a[1, 2].item()] == draws.tolist()


def test_decode_code_equals_decode_of_codebook_vectors() -> None:
    model = VQModel.from_config(shrink(FIRST_STAGE_ZOO["vq-f8"])).eval()
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
        codes = torch.randint(0, 16, (2, 3, 4))
        vectors = model.quantize.embedding.weight[codes].permute(0, 3, 1, 2).contiguous()
        ref = model.decoder(model.post_quant_conv(vectors))
        torch.testing.assert_close(model.decode_code(codes), ref)
        torch.testing.assert_close(model.decode_code(codes.reshape(2, -1), shape=(2, 3, 4)), ref)
        torch.testing.assert_close(model.decode(vectors), ref)  # codebook vectors quantise to themselves
