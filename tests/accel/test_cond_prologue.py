"""Conditioning-only work taken out of the captured call (``ldm_sdk.accel.cond_prologue``).

CPU, float32, the emulated capture (the static-buffer logic the CUDA graphs use): a tiny SD-style UNet
whose cross-attentions share one K / V projection (``fuse_blocks``) exposes it as its
``conditioning_prologue``; the captured call computes it once per conditioning copied in, the call itself
then projects nothing, and every replay equals the eager call bit for bit -- for the same conditioning
passed again (``cond_unchanged``), a new one, and one changed in place without the caller saying so.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import unfuse_blocks
from ldm_sdk.accel.cond_prologue import ConditioningPrologue, PrologueResults, find_prologues
from ldm_sdk.accel.context_projections import ContextProjections
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from tests.accel.test_context_projections import fused_unet, inputs


def captured(unet: torch.nn.Module) -> CapturedModel:
    return CapturedModel(bind_unet(unet, "crossattn"), mode="emulate", modules=[unet], warmup=1)


def projections(unet: torch.nn.Module) -> ContextProjections:
    (prologue,) = find_prologues([unet])
    assert isinstance(prologue, ContextProjections)
    return prologue


def assert_same(a: Tensor, b: Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), float((a - b).abs().max())


def test_the_shared_projection_is_the_unets_prologue() -> None:
    unet, plain = fused_unet()
    prologue = projections(unet)
    assert isinstance(prologue, ConditioningPrologue)
    assert find_prologues([plain]) == []
    _, _, ctx = inputs(unet)
    weight = torch.cat(prologue.weights)
    result = prologue.compute(Conditioning(crossattn=ctx))
    assert result is not None and torch.allclose(result, ctx @ weight.T, rtol=1e-5, atol=1e-6)
    # what does not fit the weights is left to the call
    assert prologue.compute(Conditioning()) is None
    assert prologue.compute(Conditioning(crossattn=ctx.double())) is None
    assert prologue.compute(Conditioning(crossattn=ctx[..., :8])) is None
    unfuse_blocks(unet)
    assert find_prologues([unet]) == []


def test_held_results_replace_the_projection_for_that_context_only() -> None:
    unet, _ = fused_unet()
    prologue = projections(unet)
    x, t, ctx = inputs(unet)
    cond = Conditioning(crossattn=ctx)
    eager = unet(x, t, context=ctx)
    results = PrologueResults([prologue], cond)
    with results.held():
        held = unet(x, t, context=ctx)
        assert prologue._memo is None  # every attention took the held keys and values
        other = ctx.clone()
        unet(x, t, context=other)
        assert prologue._memo is not None and prologue._memo[1] is other  # another tensor: projected
    assert prologue._held is None
    assert_same(held, eager)
    # a deliberately wrong held result shows that it is what the call read
    with prologue.holding(cond, torch.zeros_like(results.results[0][1])):
        assert not torch.equal(unet(x, t, context=ctx), eager)


def test_captured_call_runs_the_prologue_once_per_conditioning() -> None:
    unet, _ = fused_unet()
    fast = captured(unet)
    x, t, ctx = inputs(unet)
    cond = Conditioning(crossattn=ctx)
    eager = [unet(x + step, t, context=ctx) for step in range(3)]
    got = [fast(x + step, t, cond, cond_unchanged=True) for step in range(3)]
    assert projections(unet)._memo is None  # the replays projected nothing themselves
    for a, b in zip(got, eager, strict=True):
        assert_same(a, b)
    capture = next(iter(fast._captures.values()))
    assert capture.prologue is not None and capture.prologue_replays == 1

    # without the caller's word the conditioning is copied in again, and projected again
    assert_same(fast(x, t, cond), unet(x, t, context=ctx))
    assert capture.prologue_replays == 2

    # another conditioning tensor, even with cond_unchanged: copied and projected
    _, _, ctx2 = inputs(unet, seed=1)
    assert_same(fast(x, t, Conditioning(crossattn=ctx2), cond_unchanged=True), unet(x, t, context=ctx2))
    assert capture.prologue_replays == 3

    # changed in place and passed without cond_unchanged: seen
    ctx2.mul_(-1.0)
    assert_same(fast(x, t, Conditioning(crossattn=ctx2)), unet(x, t, context=ctx2))
    assert capture.prologue_replays == 4


def test_load_skips_only_the_very_tensors_copied_last() -> None:
    unet, _ = fused_unet()
    fast = captured(unet)
    x, t, ctx = inputs(unet)
    cond = Conditioning(crossattn=ctx)
    fast(x, t, cond)
    capture = next(iter(fast._captures.values()))
    with torch.inference_mode():  # as CapturedModel loads them
        assert capture.load(x, t, cond, cond_unchanged=True) is False
        assert capture.load(x, t, cond) is True
        assert capture.load(x, t, Conditioning(crossattn=ctx.clone()), cond_unchanged=True) is True
        assert capture.load(x, t, cond, cond_unchanged=True) is True  # not the tensor copied last
    del cond, ctx  # the capture keeps no reference to the caller's tensors
    assert all(ref() is None for ref in capture.loaded.values())


@pytest.mark.parametrize("share_input", [False, True])
def test_guided_step_copies_its_conditioning_once_per_request(share_input: bool) -> None:
    from ldm_sdk.accel.guided_step import guided_denoiser
    from ldm_sdk.diffusion.denoiser import ModelDenoiser
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.samplers import ddim
    from ldm_sdk.samplers.base import ddim_timesteps

    unet, _ = fused_unet()
    fast = captured(unet)
    schedule = DiffusionSchedule(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    x, _, ctx = inputs(unet)
    cond, uncond = Conditioning(crossattn=ctx[:1]), Conditioning(crossattn=ctx[1:])
    ts = ddim_timesteps(4)
    den = guided_denoiser(fast, schedule, "eps", cond, uncond, 5.0, share_input=share_input)
    with torch.inference_mode():
        got = ddim.sample(den, x[:1], ts)
    step = fast.companions[("guided", id(schedule), "eps", share_input)]
    capture = next(iter(step._captures.values()))
    assert capture.replays == 4 and capture.prologue_replays == 1
    # the same guided step run eagerly (no capture, so no prologue), and plain guidance
    off = CapturedModel(bind_unet(unet, "crossattn"), mode="off", modules=[unet])
    eager_step = guided_denoiser(off, schedule, "eps", cond, uncond, 5.0, share_input=share_input)
    plain = ModelDenoiser(
        ClassifierFreeGuidance(bind_unet(unet, "crossattn"), 5.0, uncond), schedule, "eps", cond
    )
    with torch.inference_mode():
        assert_same(got, ddim.sample(eager_step, x[:1], ts))
        eager = ddim.sample(plain, x[:1], ts)
    if share_input:  # the layers before the first cross-attention ran once for both halves
        torch.testing.assert_close(got, eager, rtol=0, atol=1e-4 * float(eager.abs().max()))
    else:
        assert_same(got, eager)
    # a second request: its own conditioning, copied and projected at its first step
    den2 = guided_denoiser(fast, schedule, "eps", uncond, cond, 5.0, share_input=share_input)
    with torch.inference_mode():
        ddim.sample(den2, x[:1], ts)
    assert capture.prologue_replays == 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_hybrid_conditioning_projects_its_crossattn_part_once(device: str) -> None:
    """An SD-inpainting-like UNet (hybrid: the masked image concatenated to x, the prompt through
    cross-attention): the prologue takes the crossattn part; the guided step's replays equal the eager
    guidance bit for bit (CPU: the emulated capture; CUDA: real graphs, float32)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ldm_sdk.accel import fuse_blocks, fuse_model
    from ldm_sdk.accel.guided_step import guided_denoiser
    from ldm_sdk.benchmarks.common import randomize_
    from ldm_sdk.diffusion.denoiser import ModelDenoiser
    from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
    from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
    from ldm_sdk.models.unet import UNetModel
    from ldm_sdk.samplers import ddim
    from ldm_sdk.samplers.base import ddim_timesteps
    from ldm_sdk.testing.tiny import tiny_unet

    config = tiny_unet(
        9, 4, num_heads=2, use_spatial_transformer=True, context_dim=24, attention_resolutions=(1, 2)
    )
    unet = UNetModel.from_config(config).eval().requires_grad_(False)
    randomize_(unet, torch.Generator().manual_seed(3))
    unet = unet.to(device)  # fused where its weights live (a move unstacks them)
    fuse_model(unet, backend="reference")
    fuse_blocks(unet, backend="reference")
    fn = bind_unet(unet, "hybrid")
    mode = "emulate" if device == "cpu" else "graph"
    fast = CapturedModel(fn, mode=mode, modules=[unet], warmup=1)
    g = torch.Generator().manual_seed(4)
    masked = torch.randn(1, 5, 16, 16, generator=g).to(device)
    cond = Conditioning(concat=masked, crossattn=torch.randn(1, 7, 24, generator=g).to(device))
    uncond = Conditioning(concat=masked, crossattn=torch.randn(1, 7, 24, generator=g).to(device))
    schedule = DiffusionSchedule(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    x, ts = torch.randn(1, 4, 16, 16, generator=g).to(device), ddim_timesteps(4)
    with torch.inference_mode():
        got = ddim.sample(guided_denoiser(fast, schedule, "eps", cond, uncond, 4.0), x, ts)
        eager = ddim.sample(
            ModelDenoiser(ClassifierFreeGuidance(fn, 4.0, uncond), schedule, "eps", cond), x, ts
        )
    (step,) = fast.companions.values()
    capture = next(iter(step._captures.values()))
    assert capture.prologue is not None and capture.prologue_replays == 1 and capture.replays == 4
    assert_same(got, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_prologue_graph_equals_the_eager_call(dtype: torch.dtype) -> None:
    """On CUDA the K / V projection is a graph of its own, replayed once per conditioning copied in; the
    call's graph reads its result; every replay equals the eager call bit for bit, prompts changing or not."""
    from ldm_sdk.accel import fuse_blocks, fuse_model
    from ldm_sdk.accel.prepare import prepare_cuda_inference

    _, plain = fused_unet()
    unet = plain.cuda().to(dtype)  # fused where its weights live (a move unstacks them)
    if dtype == torch.float16:
        prepare_cuda_inference(unet)
    else:
        fuse_model(unet, backend="reference")
        fuse_blocks(unet, backend="reference")
    assert find_prologues([unet]), "the fused UNet on CUDA has no shared K / V projection"
    fn = bind_unet(unet, "crossattn")
    fast = CapturedModel(fn, mode="graph", modules=[unet])
    x, t, ctx = (v.cuda() for v in inputs(unet))
    x, ctx = x.to(dtype), ctx.to(dtype)
    cond = Conditioning(crossattn=ctx)
    with torch.inference_mode():
        for step in range(3):
            assert_same(fast(x + step, t, cond, cond_unchanged=True), fn(x + step, t, cond))
        capture = next(iter(fast._captures.values()))
        assert capture.prologue_graph is not None and capture.prologue_replays == 1
        other = Conditioning(crossattn=torch.randn_like(ctx))
        assert_same(fast(x, t, other, cond_unchanged=True), fn(x, t, other))
        assert_same(fast(x, t, cond, cond_unchanged=True), fn(x, t, cond))
        assert capture.prologue_replays == 3
