"""MaskConditioner: the LDM 7-channel and SD 9-channel concat maps, written out by hand in CompVis order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.encoders.mask import MaskConditioner, MaskedImage
from ldm_sdk.models.configs import DDConfig
from ldm_sdk.models.first_stage import AutoencoderKL


class PoolStage(nn.Module):
    """A closed-form stand-in first stage: average-pool by ``f``, then a fixed channel mix."""

    def __init__(self, latent_channels: int, factor: int) -> None:
        super().__init__()
        self.latent_channels, self.downsampling_factor = latent_channels, factor
        self.mix = torch.arange(1.0, 3.0 * latent_channels + 1).reshape(latent_channels, 3) / 10

    def encode(self, x: Tensor) -> Tensor:
        return torch.einsum("lc,bchw->blhw", self.mix, F.avg_pool2d(x, self.downsampling_factor))


def _batch(h: int = 32, w: int = 32) -> tuple[Tensor, Tensor]:
    image = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, h, w)
    mask[0, :, 4:20, 8:24] = 1.0
    mask[1, :, h // 2 :, :] = 1.0
    return image, mask


def test_ldm_variant_matches_inpaint_script() -> None:
    stage = PoolStage(3, 4)
    enc = MaskConditioner(stage, variant="ldm")
    image, mask = _batch()
    out = enc(MaskedImage(image, mask))
    # scripts/inpaint.py: everything in [0, 1], masked = (1 - mask) * image, then ALL mapped by x * 2 - 1
    image01 = (image + 1) / 2
    masked = ((1 - mask) * image01) * 2 - 1
    c = stage.encode(masked)
    cc = (mask * 2 - 1)[:, :, ::4, ::4]  # nearest to c's size reads pixel 4i
    expected = torch.cat([c, cc], dim=1)
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(out, expected)
    assert set(out[:, 3].unique().tolist()) == {-1.0, 1.0}
    enc.contract().check(out, batch=2, image_hw=(32, 32))


def test_sd_variant_matches_latent_inpaint_diffusion() -> None:
    stage = PoolStage(4, 8)
    enc = MaskConditioner(stage, variant="sd", scale_factor=0.18215)
    image, mask = _batch()
    out = enc(MaskedImage(image, mask))
    # make_batch_sd: masked_image = image * (mask < 0.5); c_cat = [mask (nearest), scale * encode(masked)]
    masked = image * (mask < 0.5)
    expected = torch.cat([mask[:, :, ::8, ::8], 0.18215 * stage.encode(masked)], dim=1)
    assert out.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out, expected)
    enc.contract().check(out, batch=2, image_hw=(32, 32))


def test_soft_mask_is_binarised_at_half() -> None:
    enc = MaskConditioner(PoolStage(4, 8), variant="sd")
    image, mask = _batch()
    soft = mask * 0.7 + (1 - mask) * 0.3  # >= 0.5 inside, < 0.5 outside
    torch.testing.assert_close(enc(MaskedImage(image, soft)), enc(MaskedImage(image, mask)), rtol=0, atol=0)


def test_kl_first_stage_mode_and_sample() -> None:
    dd = DDConfig(z_channels=4, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    fsm = AutoencoderKL(dd, embed_dim=4).eval()
    enc = MaskConditioner(fsm, variant="sd", scale_factor=0.5)
    assert (enc.latent_channels, enc.latent_factor) == (4, 2)
    assert dict(enc.state_dict()) == {} and not list(enc.parameters())  # the first stage is not registered
    enc.load_state_dict({}, strict=True)  # an SD-inpainting cond_stage has no mask weights
    image, mask = _batch(16, 16)
    with torch.no_grad():
        ref = fsm.encode(image * (mask < 0.5)).mode() * 0.5
    out = enc(MaskedImage(image, mask))
    torch.testing.assert_close(out[:, 1:], ref)
    sampler = MaskConditioner(fsm, variant="sd", scale_factor=0.5, sample_posterior=True)
    s1 = sampler(MaskedImage(image, mask), torch.Generator().manual_seed(4))
    s2 = sampler(MaskedImage(image, mask), torch.Generator().manual_seed(4))
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.allclose(s1[:, 1:], ref)


def test_guidance_reuses_the_same_concat() -> None:
    enc = MaskConditioner(PoolStage(4, 8), variant="sd")
    inputs = MaskedImage(*_batch())
    with pytest.raises(ValueError, match=r"never dropped.*unconditional_concat"):
        enc.unconditional(2)
    cc = enc(inputs)
    ucc = enc.unconditional_concat(inputs)
    torch.testing.assert_close(ucc, cc, rtol=0, atol=0)
    text, uc_text = torch.randn(2, 3, 8), torch.zeros(2, 3, 8)
    both = Conditioning.cat(
        Conditioning(crossattn=text, concat=cc), Conditioning(crossattn=uc_text, concat=ucc)
    )
    assert both.concat is not None and torch.equal(both.concat[:2], both.concat[2:])


def test_from_bundle_picks_variant_and_scale() -> None:
    stage = PoolStage(4, 8)
    sd = MaskConditioner.from_bundle(
        SimpleNamespace(conditioning_key="hybrid", scale_factor=0.18215, first_stage_model=stage)
    )
    assert (sd.variant, sd.scale_factor) == ("sd", 0.18215)
    ldm = MaskConditioner.from_bundle(
        SimpleNamespace(conditioning_key="concat", scale_factor=1.0, first_stage_model=PoolStage(3, 4))
    )
    assert (ldm.variant, ldm.contract().channels) == ("ldm", 4)
    with pytest.raises(ValueError, match="not an inpainting model's"):
        MaskConditioner.from_bundle(SimpleNamespace(conditioning_key="crossattn", scale_factor=1.0))


def test_from_bundle_with_an_encode_callable_equals_the_first_stage() -> None:
    """The tasks pass the first stage's captured encode (the KL posterior mode) in its place: the same map
    as the first stage itself, with the sizes taken from the bundle."""
    dd = DDConfig(z_channels=4, resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    fsm = AutoencoderKL(dd, embed_dim=4).eval()
    bundle = SimpleNamespace(
        conditioning_key="hybrid",
        scale_factor=0.5,
        first_stage_model=fsm,
        latent_channels=4,
        downsampling_factor=2,
    )
    calls: list[Tensor] = []

    def mode(x: Tensor) -> Tensor:
        calls.append(x)
        return fsm.encode(x).mode()

    inputs = MaskedImage(*_batch(16, 16))
    via_callable = MaskConditioner.from_bundle(bundle, encode=mode)
    assert (via_callable.latent_channels, via_callable.latent_factor) == (4, 2)
    assert torch.equal(via_callable(inputs), MaskConditioner.from_bundle(bundle)(inputs)) and len(calls) == 1
    with pytest.raises(ValueError, match="sample_posterior needs the first stage"):
        MaskConditioner.from_bundle(bundle, encode=mode, sample_posterior=True)


def test_input_errors_say_what_was_wrong() -> None:
    enc = MaskConditioner(PoolStage(4, 8), variant="sd")
    image, mask = _batch()
    with pytest.raises(ValueError, match=r"mask \[2, 1, 16, 32\] does not match image \[2, 3, 32, 32\]"):
        enc(MaskedImage(image, mask[:, :, :16]))
    with pytest.raises(ValueError, match=r"mask must be in \[0, 1\].*uint8 mask\? use mask / 255"):
        enc(MaskedImage(image, mask * 255))
    with pytest.raises(ValueError, match=r"\[-1, 1\] mask\? use \(mask \+ 1\) / 2"):
        enc(MaskedImage(image, mask * 2 - 1))
    empty = mask.clone()
    empty[1] = 0.4
    with pytest.raises(ValueError, match=r"batch item\(s\) \[1\] selects no pixel"):
        enc(MaskedImage(image, empty))
    with pytest.raises(ValueError, match=r"batch item\(s\) \[0, 1\] covers the whole image"):
        enc(MaskedImage(image, torch.ones_like(mask)))
    with pytest.raises(ValueError, match=r"image must be in \[-1, 1\]"):
        enc(MaskedImage((image + 1) * 127.5, mask))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        enc(MaskedImage(image, mask.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="multiple of the latent factor 8"):
        enc(MaskedImage(image[..., :28], mask[..., :28]))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"scale_factor must be 1\.0"):
        MaskConditioner(PoolStage(3, 4), variant="ldm", scale_factor=0.18215)
    with pytest.raises(ValueError, match="unknown inpainting variant 'sd2'"):
        MaskConditioner(PoolStage(3, 4), variant="sd2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass latent_channels="):
        MaskConditioner(lambda x: x, variant="sd")
    with pytest.raises(ValueError, match="latent_factor=4 contradicts"):
        MaskConditioner(PoolStage(4, 8), latent_factor=4)
    enc = MaskConditioner(PoolStage(4, 8).encode, latent_channels=4, latent_factor=8)
    assert enc.contract().channels == 5 and (enc.modality, enc.trainable) == ("mask", False)
