"""img2img the CompVis way: encode at ddim_timesteps[t_enc], denoise ddim_timesteps[:t_enc] reversed."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.img2img import img2img_start, stochastic_encode
from ldm_sdk.samplers.base import ddim_timesteps


def test_compvis_truncation_and_off_by_one() -> None:
    # scripts/img2img.py defaults: 50 DDIM steps (1, 21, ..., 981), strength 0.75 -> t_enc = 37
    t_enc, run = img2img_start(ddim_timesteps(50), 0.75)
    assert float(t_enc) == 37 * 20 + 1  # ddim_timesteps[37] ascending = 741
    assert run.tolist() == [20.0 * k + 1 for k in range(36, -1, -1)]  # 721, 701, ..., 1: 37 steps


def test_strength_edges() -> None:
    full = ddim_timesteps(10)
    t_enc, run = img2img_start(full, 0.0)
    assert float(t_enc) == 1 and run.numel() == 0
    # CompVis would index past its table at strength 1; we encode at the top step and run them all
    t_enc, run = img2img_start(full, 1.0)
    assert float(t_enc) == 901 and torch.equal(run, full)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        img2img_start(full, 1.5)
    with pytest.raises(ValueError, match="descending"):
        img2img_start(full.flip(0), 0.5)


def test_stochastic_encode_formula(schedule, ref_alpha_bar) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    a = ref_alpha_bar[741]
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    ours = stochastic_encode(schedule, x0, torch.tensor(741.0), noise)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        stochastic_encode(schedule, x0, 741.0, noise[:1])
