"""Cross-attention K/V cache (ldm_sdk.accel.kv_cache): bit-identical to the plain model at the same dtype,
recomputes whenever the context values, its layout or the weights change, never used for self-attention or
while gradients are recorded, and leaves state_dict / module paths unchanged."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from ldm_sdk.accel.cpu_prepack import PackedLinear, prepack_cpu_weights
from ldm_sdk.accel.kv_cache import (
    ContextCachedLinear,
    cache_context_projections,
    context_cache_of,
    uncache_context_projections,
)
from ldm_sdk.models.attention import CrossAttention, SpatialTransformer
from ldm_sdk.testing.tiny import ALL, random_bundle
from tests.accel.capture_checks import random_inputs, run_ddim_cfg

CPU = torch.device("cpu")


def unet_pair(family: str = "sd1", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """(plain, cached) copies of one random tiny UNet."""
    unet = random_bundle(ALL[family]).unet.eval().requires_grad_(False).to(dtype)
    cached = copy.deepcopy(unet)
    cache_context_projections(cached)
    return unet, cached


def n_context_attentions(model: nn.Module) -> int:
    return sum(
        1 for name, m in model.named_modules() if isinstance(m, CrossAttention) and name.endswith("attn2")
    )


@pytest.mark.parametrize("family", ["sd1", "sd2_v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_over_steps(family: str, dtype: torch.dtype) -> None:
    """Several calls with one context value (a fresh tensor each time, as the guidance wrapper makes it) and
    changing x / t: every output equals the plain model's exactly; after the first call every K/V
    projection is a hit."""
    unet, cached = unet_pair(family, dtype)
    bundle = random_bundle(ALL[family])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, dtype, seed=1)
    context = cond.crossattn
    assert context is not None
    n = n_context_attentions(unet)
    assert n > 0
    cache = context_cache_of(cached)
    assert cache is not None
    with torch.inference_mode():
        for step in range(4):
            xs, ts = x * (1 + 0.1 * step), t * (1 - 0.2 * step)
            ref = unet(xs, ts, context=context)
            out = cached(xs, ts, context=context.clone())  # new tensor, same values
            assert torch.equal(out, ref), f"step {step}: cached vs plain differ"
    assert cache.stats.misses == 2 * n  # to_k and to_v of each cross-attention, once
    assert cache.stats.hits == 3 * 2 * n
    assert cache.stats.new_contexts == 1
    assert cache.stats.value_checks == 3  # one torch.equal per later call, not one per layer


def test_new_values_layout_and_weights_recompute() -> None:
    unet, cached = unet_pair()
    bundle = random_bundle(ALL["sd1"])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=2)
    context = cond.crossattn
    assert context is not None
    cache = context_cache_of(cached)
    assert cache is not None
    n = n_context_attentions(unet)
    with torch.inference_mode():
        assert torch.equal(cached(x, t, context=context), unet(x, t, context=context))
        # 1. same tensor object, values changed in place between calls
        context.mul_(1.5)
        assert torch.equal(cached(x, t, context=context), unet(x, t, context=context))
        assert cache.stats.misses == 2 * 2 * n
        # 2. same values, another layout (non-contiguous): a miss, the kernel may round differently
        strided = context.transpose(0, 1).contiguous().transpose(0, 1)
        assert not strided.is_contiguous() and torch.equal(strided, context)
        assert torch.equal(cached(x, t, context=strided), unet(x, t, context=strided))
        assert cache.stats.misses == 3 * 2 * n
        # 3. the earlier context again: each projection keeps one entry, so it computes afresh (no new
        # reference copy of the context though: the cache still knows that value)
        assert torch.equal(cached(x, t, context=context.clone()), unet(x, t, context=context))
        assert cache.stats.misses == 4 * 2 * n and cache.stats.new_contexts == 3
        # 4. another batch size
        x3, t3, c3 = random_inputs(bundle, 3, 16, CPU, torch.float32, seed=3)
        assert torch.equal(cached(x3, t3, context=c3.crossattn), unet(x3, t3, context=c3.crossattn))
    # 5. a weight edited in place (version counter) and a state dict loaded (copy_ into the Parameters)
    attn = next(m for n_, m in cached.named_modules() if n_.endswith("attn2"))
    plain_attn = next(m for n_, m in unet.named_modules() if n_.endswith("attn2"))
    with torch.no_grad():
        attn.to_k.weight.mul_(-1.0)
        plain_attn.to_k.weight.mul_(-1.0)
    with torch.inference_mode():
        assert torch.equal(cached(x, t, context=context), unet(x, t, context=context))
    new_state = {k: v * 0.5 if "attn2.to_v" in k else v for k, v in unet.state_dict().items()}
    unet.load_state_dict(new_state)
    cached.load_state_dict(new_state)
    with torch.inference_mode():
        assert torch.equal(cached(x, t, context=context), unet(x, t, context=context))
    # 6. a dtype cast replaces the weights (new memory): computed afresh in the new dtype
    unet.to(torch.bfloat16)
    cached.to(torch.bfloat16)
    with torch.inference_mode():
        cb = context.bfloat16()
        assert torch.equal(cached(x, t, context=cb), unet(x, t, context=cb))


def test_self_attention_is_never_cached() -> None:
    """attn1 (self-attention) sees a new input every step: its projections must compute every time, so only
    the cross-attention layers count hits."""
    _, cached = unet_pair()
    cache = context_cache_of(cached)
    assert cache is not None
    bundle = random_bundle(ALL["sd1"])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=4)
    n = n_context_attentions(cached)
    attn1 = [m for name, m in cached.named_modules() if name.endswith("attn1")]
    assert attn1
    with torch.inference_mode():
        for _ in range(3):
            cached(x, t, context=cond.crossattn)
    assert cache.stats.hits + cache.stats.misses == 3 * 2 * n  # nothing from the self-attention layers
    assert all(type(m.to_k) is nn.Linear and type(m.to_v) is nn.Linear for m in attn1)
    # a CrossAttention called without a context attends to x: never cached
    lone = CrossAttention(16, heads=2, dim_head=8).eval()
    cache_context_projections(lone)
    lone_cache = context_cache_of(lone)
    assert lone_cache is not None
    h = torch.randn(2, 5, 16)
    with torch.inference_mode():
        lone(h)
        lone(h, context=h)  # the context *is* x: self-attention as well
    assert lone_cache.stats.hits == lone_cache.stats.misses == 0


def test_training_bypasses_the_cache() -> None:
    """With gradients recorded the projections run every time and gradients equal the plain model's."""
    bundle = random_bundle(ALL["sd1"])
    unet = bundle.unet.train()
    cached = copy.deepcopy(unet)
    cache = cache_context_projections(cached)
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=5)
    for model in (unet, cached):
        model.zero_grad()
        model(x, t, context=cond.crossattn).square().mean().backward()
        model(x, t, context=cond.crossattn).square().mean().backward()
    assert cache.stats.hits == cache.stats.misses == 0
    for (name, p), q in zip(unet.named_parameters(), cached.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.equal(p.grad, q.grad), name


def test_structure_unchanged_and_undo() -> None:
    unet, cached = unet_pair()
    assert list(cached.state_dict()) == list(unet.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(cached.state_dict().values(), unet.state_dict().values(), strict=True)
    )
    assert [n for n, _ in cached.named_modules()] == [n for n, _ in unet.named_modules()]
    swapped = [m for m in cached.modules() if isinstance(m, ContextCachedLinear)]
    assert len(swapped) == 2 * n_context_attentions(cached)  # to_k / to_v of attn2 only
    cache = context_cache_of(cached)
    assert cache is not None and cache.layers == n_context_attentions(cached)
    assert cache_context_projections(cached) is context_cache_of(cached)  # idempotent
    # pickles and deep-copies (the hook is a bound method); the copy has its own cache
    clone = pickle.loads(pickle.dumps(cached))
    assert context_cache_of(clone) is not context_cache_of(cached)
    bundle = random_bundle(ALL["sd1"])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=6)
    with torch.inference_mode():
        assert torch.equal(clone(x, t, context=cond.crossattn), unet(x, t, context=cond.crossattn))
    clone_cache = context_cache_of(clone)
    assert clone_cache is not None and clone_cache.stats.misses > 0
    uncache_context_projections(cached)
    assert context_cache_of(cached) is None
    assert not any(isinstance(m, ContextCachedLinear) for m in cached.modules())
    assert not cached._forward_pre_hooks and not any(m._forward_pre_hooks for m in cached.modules())
    with torch.inference_mode():
        assert torch.equal(cached(x, t, context=cond.crossattn), unet(x, t, context=cond.crossattn))


def test_after_prepacking_the_projections_are_cached() -> None:
    """cache_context_projections on a prepacked model takes over to_k / to_v (their packed copy is dropped:
    they run once per context)."""
    unet = random_bundle(ALL["sd1"]).unet.eval().requires_grad_(False).to(torch.bfloat16)
    unet.to(memory_format=torch.channels_last)
    fast = copy.deepcopy(unet)
    prepack_cpu_weights(fast)
    cache = cache_context_projections(fast)
    attn2 = [m for name, m in fast.named_modules() if name.endswith("attn2")]
    assert all(type(m.to_k) is ContextCachedLinear and type(m.to_q) is PackedLinear for m in attn2)
    bundle = random_bundle(ALL["sd1"])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.bfloat16, seed=7)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(fast(x, t, context=cond.crossattn), unet(x, t, context=cond.crossattn))
    assert cache.stats.hits == 2 * len(attn2)


def test_guided_ddim_through_the_sampler_is_bit_identical() -> None:
    """The SDK's DDIM + classifier-free guidance (a new [uncond; cond] tensor at every step): the same final
    latents bit for bit, with the K/V projections computed once."""
    bundle = random_bundle(ALL["sd1"])
    bundle.model.eval().requires_grad_(False)
    ref, _ = run_ddim_cfg(bundle, CPU, torch.float32, None, steps=10)
    cache = cache_context_projections(bundle.unet)
    out, _ = run_ddim_cfg(bundle, CPU, torch.float32, None, steps=10)
    assert torch.equal(out, ref)
    n = n_context_attentions(bundle.unet)
    assert cache.stats.misses == 2 * n and cache.stats.hits == 2 * n * 9


def test_disable_self_attn_caches_attn1_too() -> None:
    """SD 2.x's disable_self_attn makes attn1 attend to the context as well: both attentions are cached."""
    torch.manual_seed(8)
    plain = SpatialTransformer(32, 2, 16, depth=2, context_dim=24, disable_self_attn=True).eval()
    for p in plain.parameters():  # proj_out starts at zero: make the output depend on everything
        p.data.normal_(0, 0.2)
    cached = copy.deepcopy(plain)
    cache = cache_context_projections(cached)
    assert cache.layers == 4  # attn1 and attn2 of two blocks
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 24)
    with torch.inference_mode():
        for i in range(3):
            assert torch.equal(cached(x * (i + 1), context=ctx.clone()), plain(x * (i + 1), context=ctx))
    assert cache.stats.misses == 2 * 4 and cache.stats.hits == 2 * 2 * 4


def test_expanded_context_view() -> None:
    """A batch-1 context expanded to the batch (stride 0, as Conditioning.expand makes it) is cached too."""
    unet, cached = unet_pair()
    bundle = random_bundle(ALL["sd1"])
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=10)
    assert cond.crossattn is not None
    one = cond.crossattn[:1]
    with torch.inference_mode():
        for _ in range(2):
            view = one.expand(2, -1, -1)
            assert view.stride(0) == 0
            assert torch.equal(cached(x, t, context=view), unet(x, t, context=view))
    cache = context_cache_of(cached)
    assert cache is not None and cache.stats.hits == 2 * n_context_attentions(unet)
