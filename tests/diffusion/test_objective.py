"""The CompVis p_losses objective: targets, lvlb weights and exact loss values on fixed inputs."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.objective import diffusion_loss, lvlb_weights, training_target
from ldm_sdk.models.configs import DiffusionConfig

GEN = torch.Generator().manual_seed(0)
X0 = torch.randn(3, 4, 2, 2, generator=GEN)
NOISE = torch.randn(3, 4, 2, 2, generator=GEN)
OUT = torch.randn(3, 4, 2, 2, generator=GEN)
T = torch.tensor([0, 417, 999])
CONFIG = dict(linear_start=0.00085, linear_end=0.012)


def test_targets(schedule, ref_alpha_bar) -> None:
    a = ref_alpha_bar[T].reshape(-1, 1, 1, 1)
    assert torch.equal(training_target(schedule, "eps", X0, NOISE, T), NOISE)
    assert torch.equal(training_target(schedule, "x0", X0, NOISE, T), X0)
    v = a.sqrt() * NOISE.double() - (1 - a).sqrt() * X0.double()  # Salimans & Ho 2022
    torch.testing.assert_close(training_target(schedule, "v", X0, NOISE, T).double(), v, rtol=1e-6, atol=1e-6)


def test_lvlb_weights(schedule, ref_alpha_bar) -> None:
    ab = ref_alpha_bar
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alphas = ab / ab_prev
    betas = 1 - alphas
    posterior_var = betas * (1 - ab_prev) / (1 - ab)
    eps = betas**2 / (2 * posterior_var * alphas * (1 - ab))
    eps[0] = eps[1]  # entry 0 divides by posterior_var[0] = 0
    torch.testing.assert_close(lvlb_weights(schedule, "eps").double(), eps, rtol=2e-5, atol=0)
    # CompVis writes 0.5 * sqrt(ab) / (2. * 1 - ab): by precedence that is 2 - ab, kept for identical losses
    x0 = 0.5 * ab.sqrt() / (2 - ab)
    x0[0] = x0[1]
    torch.testing.assert_close(lvlb_weights(schedule, "x0").double(), x0, rtol=1e-6, atol=0)
    assert torch.equal(lvlb_weights(schedule, "v"), torch.ones(1000))


def expected_loss(schedule, ref_alpha_bar, param, loss_type, logvar, simple_w, elbo_w):
    a = ref_alpha_bar[T].reshape(-1, 1, 1, 1)
    target = {"eps": NOISE.double(), "x0": X0.double(), "v": a.sqrt() * NOISE - (1 - a).sqrt() * X0}[param]
    diff = OUT.double() - target
    per = (diff**2 if loss_type == "l2" else diff.abs()).flatten(1).mean(1)
    lv = logvar.double()[T]
    weights = lvlb_weights(schedule, param).double()[T]
    vlb = (weights * per).mean()
    return simple_w * (per / lv.exp() + lv).mean() + elbo_w * vlb, per.mean(), vlb


@pytest.mark.parametrize(("param", "loss_type"), [("eps", "l2"), ("x0", "l1"), ("v", "l2")])
def test_loss_values(schedule, ref_alpha_bar, param, loss_type) -> None:
    config = DiffusionConfig(
        **CONFIG, parameterization=param, loss_type=loss_type, l_simple_weight=0.7, original_elbo_weight=0.3
    )
    logvar = torch.linspace(-1.0, 1.0, 1000)
    seen = {}

    def model_fn(x, t, cond):
        seen.update(x=x, t=t, cond=cond)
        return OUT

    cond = Conditioning(crossattn=torch.zeros(3, 1, 2))
    loss, logs = diffusion_loss(model_fn, schedule, X0, cond, T, NOISE, config, logvar)
    want, simple, vlb = expected_loss(schedule, ref_alpha_bar, param, loss_type, logvar, 0.7, 0.3)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["loss_simple"].double(), simple, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["loss_vlb"].double(), vlb, rtol=1e-5, atol=0)
    assert logs["loss"] is loss and set(logs) == {"loss_simple", "loss_vlb", "loss"}
    a = ref_alpha_bar[T].reshape(-1, 1, 1, 1)  # the model saw q_sample(x0, t, noise), t and cond unchanged
    torch.testing.assert_close(
        seen["x"].double(), a.sqrt() * X0 + (1 - a).sqrt() * NOISE, rtol=1e-5, atol=1e-6
    )
    assert seen["t"] is T and seen["cond"] is cond


def test_default_logvar_and_learned_logvar_logs(schedule, ref_alpha_bar) -> None:
    config = DiffusionConfig(**CONFIG, logvar_init=0.0, learn_logvar=True)
    loss, logs = diffusion_loss(lambda x, t, c: OUT, schedule, X0, Conditioning(), T, NOISE, config)
    want, _, _ = expected_loss(schedule, ref_alpha_bar, "eps", "l2", torch.zeros(1000), 1.0, 0.0)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    assert {"loss_gamma", "logvar"} <= set(logs)


def test_errors(schedule) -> None:
    config = DiffusionConfig(**CONFIG)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x, t, c: OUT, schedule, X0, Conditioning(), T[:2], NOISE, config)
    with pytest.raises(ValueError, match="integers"):
        diffusion_loss(lambda x, t, c: OUT, schedule, X0, Conditioning(), T + 0.5, NOISE, config)
    with pytest.raises(ValueError, match="target"):
        diffusion_loss(lambda x, t, c: OUT[:, :2], schedule, X0, Conditioning(), T, NOISE, config)
    with pytest.raises(ValueError, match=r"\(1000,\)"):
        diffusion_loss(lambda x, t, c: OUT, schedule, X0, Conditioning(), T, NOISE, config, torch.zeros(10))
