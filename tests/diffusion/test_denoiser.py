"""ModelDenoiser conversions against the closed forms (float64 alpha_bar computed independently)."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import ModelDenoiser, Prediction, signal_noise_scales

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


# -- look-ups without a host synchronisation ----------------------------------------------------------------
def test_lookup_is_exact_and_checks_cpu_timesteps(schedule) -> None:
    t = torch.tensor([0.0, 1.0, 100.5, 998.25, 999.0], dtype=torch.float64)
    sqrt_ab, sqrt_1m = signal_noise_scales(schedule, t)
    integral = torch.tensor([0, 1, 4])
    assert torch.equal(sqrt_ab[integral], schedule.sqrt_alphas_cumprod.double()[t[integral].long()])
    assert torch.equal(sqrt_1m[integral], schedule.sqrt_one_minus_alphas_cumprod.double()[t[integral].long()])
    assert torch.equal(sqrt_ab[2:4], schedule.alpha_bar(t[2:4]).sqrt())
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        signal_noise_scales(schedule, torch.tensor([1000.0]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        ModelDenoiser(fixed(OUT), schedule)(X, torch.tensor(-1.0))


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m", "euler_ancestral", "ddpm"])
def test_sampling_never_reads_a_device_tensor_on_the_host(schedule, sampler: str, param: str) -> None:
    """The whole sampler loop -- timesteps on the device, coefficient look-ups, guidance -- runs with the
    state on the "meta" device, whose tensors have no values: any read on the host (``.cpu()``, ``.item()``,
    ``if torch.any(...)`` on a device tensor), which on a GPU would wait for the model call, fails there."""
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.samplers import SAMPLERS
    from ldm_sdk.samplers.base import ddim_timesteps, karras_timesteps

    def model(x, t, cond):
        assert t.device == x.device and cond.crossattn.device == x.device
        return x * 0.5 + t.to(x.dtype).reshape(-1, 1, 1, 1) * cond.crossattn.mean()

    meta = torch.device("meta")
    uncond = Conditioning(crossattn=torch.empty(1, 3, 8, device=meta))
    cond = Conditioning(crossattn=torch.empty(1, 3, 8, device=meta))
    denoiser = ModelDenoiser(ClassifierFreeGuidance(model, 7.5, uncond), schedule, param, cond)
    steps = {
        "dpmpp_2m": karras_timesteps(schedule, 4),
        "ddpm": torch.arange(4, -1, -1, dtype=torch.float64),
    }.get(sampler, ddim_timesteps(4))
    options = {"eta": 1.0} if sampler in ("ddim", "euler_ancestral") else {}
    out = SAMPLERS[sampler](denoiser, torch.empty(1, 4, 8, 8, device=meta), steps, **options)
    assert out.device == meta and out.shape == (1, 4, 8, 8)
    assert set(schedule._tables) == {torch.device("cpu"), meta}  # the tables, copied to the device once


def test_lookup_tables_are_cached_per_device_and_follow_the_buffers(schedule) -> None:
    tables = schedule.tables()
    assert schedule.tables(torch.device("cpu")) is tables and tables.alphas_cumprod.dtype == torch.float64
    assert torch.equal(tables.alphas_cumprod, schedule.alphas_cumprod.double())
    schedule.to("cpu")  # a move (or cast) replaces the buffers: the copies are made again
    assert schedule.tables() is not tables
    tables = schedule.tables()
    state = {k: v * 0.5 for k, v in schedule.state_dict().items()}
    schedule.load_state_dict(state)  # loaded in place: made again too
    assert torch.equal(schedule.tables().alphas_cumprod, state["alphas_cumprod"].double())
    assert schedule.tables() is not tables


def test_masked_sampling_never_reads_a_device_tensor_on_the_host(schedule) -> None:
    from ldm_sdk.diffusion.masking import MaskedDenoiser
    from ldm_sdk.samplers.base import ddim_timesteps
    from ldm_sdk.samplers.ddim import sample

    meta = torch.device("meta")
    known = torch.empty(1, 4, 8, 8, device=meta)
    mask = torch.empty(1, 1, 8, 8, dtype=torch.bool, device=meta)  # a float mask is range-checked once
    denoiser = MaskedDenoiser(ModelDenoiser(lambda x, t, c: x * 0.5, schedule), known, mask)
    out = sample(denoiser, torch.empty(1, 4, 8, 8, device=meta), ddim_timesteps(4), eta=1.0)
    assert out.device == meta
