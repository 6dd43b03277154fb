"""Checks of the fast paths as plain functions (no pytest), shared by the tests and by
``bench/validate_fast_path.py``, which runs them on a GPU machine even where pytest is not installed.

Each takes the device (and dtype / capture mode) explicitly and raises ``AssertionError`` with the measured
numbers on failure. On CUDA they run with ``mode="graph"``; CI runs the same code on the CPU with
``mode="emulate"`` (static buffers and the signature cache, replayed eagerly), so the check logic itself is
tested before it reaches the GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm_sdk.accel.graphs import (
    CapturedModel,
    CaptureError,
    CaptureMode,
    accelerate_denoiser,
    bundle_denoiser,
)
from ldm_sdk.benchmarks.common import random_sd15_unet, true_float32
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.samplers.base import ddim_timesteps
from ldm_sdk.samplers.ddim import sample as ddim_sample
from ldm_sdk.testing.tiny import ALL, random_bundle

# families whose UNet call is captured: cross-attention, v-param linear transformer, hybrid (concat)
# inpainting, unconditional with AttentionBlocks, class-conditional through cross-attention
FAMILIES = ("sd1", "sd2_v", "sd_inpaint", "ldm_kl_f4_uncond", "ldm_vq_f4_class")


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (normwise), in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@dataclass
class Sd15Pair:
    """The SD-1.5 UNet in half precision, one guided step's inputs (``x`` float32 as the sampler keeps it,
    float64 ``t``, ``ctx`` float32), and the float32 model's output on them (``ref``, TF32 off) next to the
    half-precision one before any fast-path pass (``unfused``): the accuracy baseline of the fusion tests."""

    unet: UNetModel
    x: Tensor
    t: Tensor
    ctx: Tensor
    ref: Tensor
    unfused: Tensor


def sd15_pair(device: torch.device | str, dtype: torch.dtype = torch.float16, size: int = 64) -> Sd15Pair:
    """Random SD-1.5 UNet (seed 0), inputs (seed 1, latents ``size`` x ``size``), float32 reference output
    and the plain ``dtype`` output; the float32 copy is freed before returning."""
    unet32 = random_sd15_unet(device, seed=0)
    low = copy.deepcopy(unet32).to(dtype)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g, device=device)
    t = torch.tensor([981.0, 421.0], dtype=torch.float64, device=device)
    ctx = torch.randn(2, 77, 768, generator=g, device=device)
    with torch.inference_mode():
        with true_float32():
            ref = unet32(x, t, context=ctx)
        del unet32
        unfused = low(x, t, context=ctx.to(dtype))
    return Sd15Pair(low, x, t, ctx, ref, unfused)


def tolerance(dtype: torch.dtype) -> float:
    """Captured vs eager: exact in fp32 (same kernels, same inputs); half precision gets the brief's 1e-2."""
    return 0.0 if dtype == torch.float32 else 1e-2


def tiny_bundle(family: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> ModelBundle:
    """A random-weight tiny bundle with its networks on ``device`` in ``dtype`` (the schedule stays on the
    CPU in float32, as the loader leaves it)."""
    bundle = random_bundle(ALL[family], seed=seed)
    if bundle.model is None:
        raise ValueError(f"{family!r} has no UNet")
    bundle.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    bundle.first_stage_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return bundle


def random_inputs(
    bundle: ModelBundle, batch: int, size: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor, Conditioning]:
    """``x`` (float32, as the samplers keep it), ``t`` (float64 on the device, as ``time_batch`` makes it)
    and the conditioning parts the family's conditioning key needs (in the network dtype)."""
    g = torch.Generator().manual_seed(seed)
    unet = bundle.unet
    lat = bundle.latent_channels
    x = torch.randn(batch, lat, size, size, generator=g).to(device)
    t = (torch.rand(batch, generator=g, dtype=torch.float64) * 999).to(device)
    parts: dict[str, Tensor] = {}
    key = bundle.conditioning_key
    if key in ("crossattn", "hybrid"):
        context_dim = bundle.config.unet.context_dim if bundle.config.unet is not None else None
        if not isinstance(context_dim, int):
            raise ValueError(f"{bundle.family!r}: expected one int context_dim, got {context_dim!r}")
        dim = context_dim
        parts["crossattn"] = torch.randn(batch, 7, dim, generator=g).to(device, dtype)
    if key in ("concat", "hybrid"):
        extra = unet.in_channels - lat
        parts["concat"] = torch.randn(batch, extra, size, size, generator=g).to(device, dtype)
    return x, t, Conditioning(**parts)


# -- the network call, captured vs eager ---------------------------------------------------------------------
def check_unet_capture(
    device: torch.device, dtype: torch.dtype, mode: CaptureMode, family: str = "sd1", calls: int = 3
) -> dict[str, float]:
    """``accelerate_denoiser(bundle)`` vs ``bundle.apply_model`` on ``calls`` different inputs of one
    signature (capture, then replays that must pick up the new inputs), then one other batch size."""
    bundle = tiny_bundle(family, device, dtype)
    captured = accelerate_denoiser(bundle, mode=mode, fuse=False)
    worst = 0.0
    with torch.inference_mode():
        for i in range(calls):
            x, t, cond = random_inputs(bundle, 2, 16, device, dtype, seed=100 + i)
            eager = bundle.apply_model(x, t, cond)
            fast = captured(x, t, cond)
            err = rel_err(fast, eager)
            worst = max(worst, err)
            assert fast.shape == eager.shape and fast.dtype == eager.dtype
            assert err <= tolerance(dtype), f"{family} {dtype} call {i}: captured vs eager rel. err {err:.3e}"
        x, t, cond = random_inputs(bundle, 3, 16, device, dtype, seed=7)
        err = rel_err(captured(x, t, cond), bundle.apply_model(x, t, cond))
        worst = max(worst, err)
        assert err <= tolerance(dtype), f"{family} {dtype} batch 3: captured vs eager rel. err {err:.3e}"
    assert captured.stats.captures == 2, captured.stats
    assert captured.stats.replays == calls + 1, captured.stats
    return {"rel_err": worst}


def run_ddim_cfg(
    bundle: ModelBundle,
    device: torch.device,
    dtype: torch.dtype,
    mode: CaptureMode | None,
    steps: int = 20,
    scale: float = 7.5,
    seed: int = 3,
) -> tuple[Tensor, CapturedModel | None]:
    """Latents after DDIM (eta 0) with classifier-free guidance through the SDK's sampler; ``mode=None``
    is the eager ``bundle.denoiser``, otherwise :func:`bundle_denoiser` with that capture mode."""
    x, _, cond = random_inputs(bundle, 1, 16, device, dtype, seed=seed)
    _, _, uncond = random_inputs(bundle, 1, 16, device, dtype, seed=seed + 1)
    captured: CapturedModel | None = None
    if mode is None:
        den = bundle.denoiser(cond, guidance_scale=scale, uncond=uncond)
    else:
        captured = accelerate_denoiser(bundle, mode=mode, fuse=False)
        den = bundle_denoiser(bundle, cond, guidance_scale=scale, uncond=uncond, captured=captured)
    with torch.inference_mode():
        out = ddim_sample(den, x, ddim_timesteps(steps))
    return out, captured


def check_sampler_capture(device: torch.device, dtype: torch.dtype, mode: CaptureMode) -> dict[str, float]:
    """A full DDIM + CFG run with the captured network vs the eager one, same seed: exact in fp32, rel. err
    < 1e-2 in half precision; one capture (the batch-2 guidance call), replayed once per step."""
    bundle = tiny_bundle("sd1", device, dtype)
    steps = 20
    eager, _ = run_ddim_cfg(bundle, device, dtype, None, steps=steps)
    fast, captured = run_ddim_cfg(bundle, device, dtype, mode, steps=steps)
    assert captured is not None
    err = rel_err(fast, eager)
    assert torch.isfinite(eager).all(), "the eager reference run is not finite"
    assert err <= tolerance(dtype), f"DDIM+CFG {dtype}: captured vs eager rel. err {err:.3e}"
    n_steps = len(ddim_timesteps(steps))
    # the whole guided step is the guided companion's graph; the network's own graphs are not used
    assert captured.stats.captures == 0 and captured.stats.replays == 0, captured.stats
    (step,) = guided_steps(captured)
    assert step.stats.captures == 1 and step.stats.replays == n_steps, step.stats
    (signature,) = step.signatures
    assert signature.x.shape[0] == 1 and signature.t.shape == (2, 1), f"not the guided step: {signature}"
    assert dict(signature.cond)["crossattn"].shape[0] == 2, f"no [uncond; cond] conditioning: {signature}"
    return {"rel_err": err}


def guided_steps(captured: CapturedModel) -> list[CapturedModel]:
    """The guided-step companions of a network's ``CapturedModel`` (:mod:`ldm_sdk.accel.guided_step`)."""
    return [c for key, c in captured.companions.items() if isinstance(key, tuple) and key[0] == "guided"]


# -- behaviour of the wrapper on the device ----------------------------------------------------------------
def check_cache_and_outputs(device: torch.device, mode: CaptureMode) -> None:
    """Signature cache (batch / dtype changes capture anew, LRU eviction) and the two output modes."""
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).to(device)

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        h = torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x)
        return torch.tanh(h) * torch.cos(t.to(x.dtype) / 300).reshape(-1, 1, 1, 1)

    cond = Conditioning()
    with torch.inference_mode():
        model = CapturedModel(fn, mode=mode, max_graphs=2)
        xs = [torch.randn(b, 4, 8, 8, device=device) for b in (2, 2, 3)]
        ts = [
            torch.full((x.shape[0],), 10.0 * (i + 1), dtype=torch.float64, device=device)
            for i, x in enumerate(xs)
        ]
        for x, t in zip(xs, ts, strict=True):
            torch.testing.assert_close(model(x, t, cond), fn(x, t, cond), rtol=0, atol=0)
        assert model.stats.captures == 2 and model.stats.replays == 3, model.stats
        x64 = xs[0].double()
        torch.testing.assert_close(model(x64, ts[0], cond), fn(x64, ts[0], cond), rtol=0, atol=0)
        assert model.stats.captures == 3 and model.stats.evictions == 1 and len(model.signatures) == 2

        view_model = CapturedModel(fn, mode=mode, clone_output=False)
        first = view_model(xs[0], ts[0], cond)
        kept = first.clone()
        second = view_model(xs[1], ts[1], cond)
        assert second.data_ptr() == first.data_ptr(), "clone_output=False must return the static output"
        torch.testing.assert_close(first, fn(xs[1], ts[1], cond), rtol=0, atol=0)  # overwritten in place
        assert not torch.equal(kept, second)

        cloning = CapturedModel(fn, mode=mode)
        a = cloning(xs[0], ts[0], cond)
        b = cloning(xs[1], ts[1], cond)
        assert a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, fn(xs[0], ts[0], cond), rtol=0, atol=0)


def check_capture_refusals(device: torch.device) -> None:
    """A host sync inside ``fn`` and a CPU timestep are refused with a CaptureError saying why (CUDA)."""

    def syncing(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if float(x.abs().max().item()) > 1e9:  # a Python `if` on a device value: a host sync
            return x
        return x * 2

    x = torch.randn(2, 4, 8, 8, device=device)
    t = torch.full((2,), 5.0, dtype=torch.float64, device=device)
    _expect_capture_error(lambda: CapturedModel(syncing, mode="graph")(x, t, Conditioning()), "synchroniz")
    _expect_capture_error(
        lambda: CapturedModel(lambda a, b, c: a, mode="graph")(x, t.cpu(), Conditioning()), "device"
    )
    # the failed attempts leave the device usable: a plain capture still works afterwards
    model = CapturedModel(lambda a, b, c: a * 3 + b.to(a.dtype).reshape(-1, 1, 1, 1), mode="graph")
    with torch.inference_mode():
        torch.testing.assert_close(model(x, t, Conditioning()), x * 3 + 5.0, rtol=0, atol=0)


def _expect_capture_error(call: Callable[[], object], words: str) -> None:
    try:
        with torch.inference_mode():
            call()
    except CaptureError as exc:
        assert words in str(exc), f"CaptureError should mention {words!r}: {exc}"
        return
    raise AssertionError(f"expected a CaptureError mentioning {words!r}")


__all__ = [
    "FAMILIES",
    "check_cache_and_outputs",
    "check_capture_refusals",
    "check_sampler_capture",
    "check_unet_capture",
    "random_inputs",
    "rel_err",
    "run_ddim_cfg",
    "tiny_bundle",
]
