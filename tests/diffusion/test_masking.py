"""MaskedDenoiser: DDIM through it equals CompVis's masked DDIM loop, written out by hand here."""

from __future__ import annotations

import math

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.masking import MaskedDenoiser, blend_known
from ldm_sdk.samplers import ddim
from ldm_sdk.samplers.base import ddim_timesteps

GEN = torch.Generator().manual_seed(0)
NOISE = torch.randn(2, 4, 8, 8, generator=GEN)
KNOWN = torch.randn(2, 4, 8, 8, generator=GEN)
MASK = torch.zeros(2, 1, 8, 8)
MASK[:, :, :, :4] = 1.0  # keep the left half
MASK[1, :, 0, 4:] = 0.5  # a soft edge


def toy_model(x, t, cond):
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).to(x.dtype) / 2
    h = torch.einsum("oc,bchw->bohw", weight, x)
    return torch.tanh(h) * torch.cos(t.to(x.dtype) / 300).reshape(-1, 1, 1, 1) + 0.1 * x


def compvis_masked_ddim(ref_alpha_bar, steps, eta, generator):
    """CompVis ddim_sampling with mask/x0: img = q_sample(x0, ts) * mask + (1 - mask) * img, then a step."""
    img = NOISE.double()
    for i, t in enumerate(steps):
        a = float(ref_alpha_bar[t])
        a_prev = float(ref_alpha_bar[steps[i + 1]]) if i + 1 < len(steps) else float(ref_alpha_bar[0])
        q_noise = torch.randn(img.shape, generator=generator).double()
        img_orig = math.sqrt(a) * KNOWN.double() + math.sqrt(1 - a) * q_noise
        img = img_orig * MASK + (1.0 - MASK) * img
        e_t = toy_model(img, torch.full((2,), float(t), dtype=torch.float64), Conditioning())
        pred_x0 = (img - math.sqrt(1 - a) * e_t) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        img = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * e_t
        if eta > 0:
            img = img + sigma * torch.randn(img.shape, generator=generator).double()
    return img


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_compvis_masked_loop(schedule, ref_alpha_bar, eta) -> None:
    timesteps = ddim_timesteps(8)
    ref = compvis_masked_ddim(
        ref_alpha_bar, [int(t) for t in timesteps], eta, torch.Generator().manual_seed(5)
    )
    gen = torch.Generator().manual_seed(5)  # one generator for q_sample noise and DDIM noise, as CompVis
    den = MaskedDenoiser(ModelDenoiser(toy_model, schedule), KNOWN, MASK, gen)
    ours = ddim.sample(den, NOISE, timesteps, eta=eta, generator=gen)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5


def test_known_region_is_the_noised_known_latent(schedule, ref_alpha_bar) -> None:
    seen = []
    inner = ModelDenoiser(toy_model, schedule)

    class Spy:
        def __init__(self) -> None:
            self.schedule = schedule

        def __call__(self, x, t):
            seen.append((x.clone(), t.clone()))
            return inner(x, t)

    den = MaskedDenoiser(Spy(), KNOWN, MASK, torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    out = ddim.sample(den, NOISE, ddim_timesteps(4))
    keep, free = MASK.expand_as(NOISE) == 1, MASK.expand_as(NOISE) == 0
    assert len(seen) == 4
    for x_in, t in seen:
        a = ref_alpha_bar[t.long()].reshape(-1, 1, 1, 1)
        z = torch.randn(NOISE.shape, generator=replay).double()
        expected = a.sqrt() * KNOWN.double() + (1 - a).sqrt() * z
        torch.testing.assert_close(x_in.double()[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(seen[0][0][free], NOISE[free])  # the free region is the sampler's own state
    final = blend_known(out, KNOWN, MASK)
    assert torch.equal(final[keep], KNOWN[keep]) and torch.equal(final[free], out[free])


def test_errors(schedule) -> None:
    inner = ModelDenoiser(toy_model, schedule)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaskedDenoiser(inner, KNOWN, MASK * 2)
    with pytest.raises(ValueError, match="broadcast"):
        MaskedDenoiser(inner, KNOWN[:, :, :4], MASK)(NOISE, torch.tensor(10.0))
    with pytest.raises(ValueError, match="broadcast"):
        blend_known(NOISE, KNOWN, torch.ones(3, 1, 8, 8))


def test_broadcast_shape_follows_torch() -> None:
    """The plain-Python broadcast check (no sympy import on first use) agrees with torch's rules."""
    from ldm_sdk.diffusion.masking import _broadcast_shape

    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        shapes = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=rng))):
            rank = int(torch.randint(0, 4, (1,), generator=rng))
            shapes.append(tuple(int(d) for d in torch.randint(0, 3, (rank,), generator=rng)))
        try:
            want: tuple[int, ...] | None = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            want = None
        assert _broadcast_shape(*shapes) == want, shapes
