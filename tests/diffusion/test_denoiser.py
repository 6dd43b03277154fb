"""ModelDenoiser conversions against the closed forms (float64 alpha_bar computed independently)."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser, Prediction

GEN = torch.Generator().manual_seed(0)
X = torch.randn(3, 4, 5, 5, generator=GEN)
OUT = torch.randn(3, 4, 5, 5, generator=GEN)
T = torch.tensor([0.0, 321.0, 999.0])


def fixed(out):
    def model_fn(x, t, cond):
        return out

    return model_fn


def check(pred: Prediction, eps, x0) -> None:
    torch.testing.assert_close(pred.eps.double(), eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.x0.double(), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_conversions(schedule, ref_alpha_bar, param) -> None:
    a = ref_alpha_bar[T.long()].reshape(-1, 1, 1, 1)
    x, out = X.double(), OUT.double()
    pred = ModelDenoiser(fixed(OUT), schedule, param)(X, T)
    if param == "eps":
        check(pred, out, (x - (1 - a).sqrt() * out) / a.sqrt())
    elif param == "x0":
        check(pred, (x - a.sqrt() * out) / (1 - a).sqrt(), out)
    else:  # Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0
        check(pred, a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out)
    # every parameterization must be consistent with the forward process x = sqrt(a) x0 + sqrt(1 - a) eps
    recon = a.sqrt() * pred.x0.double() + (1 - a).sqrt() * pred.eps.double()
    torch.testing.assert_close(recon, x, rtol=1e-5, atol=1e-4)


def test_fractional_t_uses_interpolated_alpha_bar(schedule, ref_alpha_bar) -> None:
    t = torch.tensor([100.5, 100.5, 100.5])
    log_s = 0.5 * torch.log((1 - ref_alpha_bar) / ref_alpha_bar)
    sigma = ((log_s[100] + log_s[101]) / 2).exp()
    a = 1 / (1 + sigma**2)
    pred = ModelDenoiser(fixed(OUT), schedule)(X, t)
    torch.testing.assert_close(
        pred.x0.double(), (X.double() - (1 - a).sqrt() * OUT) / a.sqrt(), rtol=1e-5, atol=1e-5
    )


def test_model_sees_x_t_and_cond(schedule) -> None:
    seen = {}
    cond = Conditioning(crossattn=torch.ones(3, 2, 2))

    def model_fn(x, t, c):
        seen.update(x=x, t=t, c=c)
        return OUT

    ModelDenoiser(model_fn, schedule, cond=cond)(X, torch.tensor(5.0))
    assert seen["x"] is X and seen["c"] is cond and seen["t"].tolist() == [5.0] * 3


def test_clip_x0_clamps_only_x0(schedule) -> None:
    plain = ModelDenoiser(fixed(OUT), schedule)(X, T)
    clipped = ModelDenoiser(fixed(OUT), schedule, clip_x0=True)(X, T)
    assert torch.equal(clipped.eps, plain.eps)
    assert torch.equal(clipped.x0, plain.x0.clamp(-1, 1)) and plain.x0.abs().max() > 1


def test_half_input_computes_in_float32(schedule) -> None:
    pred = ModelDenoiser(fixed(OUT.half()), schedule)(X.half(), T)
    assert pred.x0.dtype == torch.float32 and pred.eps.dtype == torch.float32


def test_errors(schedule) -> None:
    with pytest.raises(ValueError, match="valid: eps, x0, v"):
        ModelDenoiser(fixed(OUT), schedule, "score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="learned variance"):
        ModelDenoiser(fixed(torch.cat([OUT, OUT], 1)), schedule)(X, T)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ModelDenoiser(fixed(OUT), schedule)(X, torch.tensor([1.0, 2.0]))
