"""Per-item generators: a batch sampled together draws, for each item, the noise of that item's own single
run. The reference is the single run itself, with a per-sample network (the toy model treats batch items
independently), so the results must agree bit for bit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser
from ldm_sdk.diffusion.masking import MaskedDenoiser
from ldm_sdk.diffusion.noise import ItemGenerators, randn
from ldm_sdk.samplers import SAMPLERS
from ldm_sdk.samplers.base import ddim_timesteps, linspace_timesteps

SEEDS = (3, 4, 5)


def gens() -> ItemGenerators:
    return ItemGenerators(torch.Generator().manual_seed(s) for s in SEEDS)


def test_randn_draws_each_item_from_its_generator() -> None:
    batch = randn((3, 2, 4, 4), gens(), device="cpu", dtype=torch.float32)
    for i, seed in enumerate(SEEDS):
        alone = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(batch[i : i + 1], alone)
    plain = torch.Generator().manual_seed(9)
    assert torch.equal(
        randn((2, 3), plain, device="cpu", dtype=torch.float64),
        torch.randn((2, 3), generator=torch.Generator().manual_seed(9), dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="first dimension must be the batch"):
        randn((2, 3), gens(), device="cpu", dtype=torch.float32)
    with pytest.raises(TypeError, match=r"takes torch\.Generator objects"):
        ItemGenerators([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one"):
        ItemGenerators([])


@pytest.mark.parametrize(
    ("name", "options"),
    [("ddim", {"eta": 0.8}), ("ddpm", {}), ("euler_ancestral", {}), ("plms", {}), ("dpmpp_2m", {})],
)
def test_every_builtin_sampler_gives_each_item_its_single_run(
    schedule, make_toy_model: Callable[..., object], name: str, options: dict
) -> None:
    denoiser = ModelDenoiser(make_toy_model(), schedule, "eps", Conditioning())  # type: ignore[arg-type]
    if name == "ddpm":
        ts = torch.arange(12, -1, -1, dtype=torch.float64)  # consecutive, through t = 0
    elif name == "euler_ancestral":
        ts = linspace_timesteps(8)
    else:
        ts = ddim_timesteps(8)
    sample = SAMPLERS[name]
    batch_gens = gens()  # the starting noise first, then the sampler's: as the single run draws
    x = randn((3, 4, 8, 8), batch_gens, device="cpu", dtype=torch.float32)
    together = sample(denoiser, x, ts, generator=batch_gens, **options)
    for i, seed in enumerate(SEEDS):
        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn((1, 4, 8, 8), generator=g)
        alone = sample(denoiser, x1, ts, generator=g, **options)
        assert torch.equal(together[i : i + 1], alone), (name, i)


def test_masked_denoiser_draws_each_items_forward_noise(schedule, make_toy_model) -> None:
    inner = ModelDenoiser(make_toy_model(), schedule, "eps", Conditioning())
    known = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    ts = ddim_timesteps(6)
    sample = SAMPLERS["ddim"]
    batch_gens = gens()
    x = randn((3, 4, 8, 8), batch_gens, device="cpu", dtype=torch.float32)
    together = sample(MaskedDenoiser(inner, known, mask, batch_gens), x, ts, generator=batch_gens, eta=0.5)
    for i, seed in enumerate(SEEDS):
        g = torch.Generator().manual_seed(seed)
        x1 = torch.randn((1, 4, 8, 8), generator=g)
        alone = sample(MaskedDenoiser(inner, known, mask, g), x1, ts, generator=g, eta=0.5)
        assert torch.equal(together[i : i + 1], alone), i


def test_a_random_state_restored_draws_the_same_numbers_again() -> None:
    """``random_state`` / ``restore_random_state``: a run repeated from a saved state (a sampling run that
    starts over) draws what it drew the first time, for one generator and for item generators."""
    from ldm_sdk.diffusion.noise import random_state, restore_random_state

    one = torch.Generator().manual_seed(1)
    items = ItemGenerators(torch.Generator().manual_seed(s) for s in (2, 3))
    for source in (one, items):
        saved = random_state(source)
        first = randn((2, 3), source, device="cpu", dtype=torch.float32)
        restore_random_state(source, saved)
        assert torch.equal(randn((2, 3), source, device="cpu", dtype=torch.float32), first)
    assert random_state(None) == [] and restore_random_state(None, []) is None
    with pytest.raises(ValueError, match="a state of 1 generator"):
        restore_random_state(items, random_state(one))
