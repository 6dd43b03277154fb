"""Cross-attention K/V cache: the context projections ``to_k(context)`` / ``to_v(context)`` computed once.

During sampling the UNet sees the same context at every step (the prompt embedding; with classifier-free
guidance the batch ``[uncond; cond]``), yet every step projects it again in every cross-attention layer:
for SD-1.5 that is 32 matmuls of ``(2B * 77, 768) x (768, C)`` per step. :func:`cache_context_projections`
makes those projections remember their result, in place:

* every ``to_k`` / ``to_v`` Linear of a :class:`~ldm_sdk.models.attention.CrossAttention` that attends to a
  context (``attn2``, and ``attn1`` with ``disable_self_attn``) gets the class :class:`ContextCachedLinear`,
  an ``nn.Linear`` subclass with the *same* Parameters, so ``state_dict()`` keys and values, ``parameters()``
  and module paths do not change. Self-attention projections (their input changes every step) are left
  alone; a pre-hook on each cached attention switches the cache off for a call without a separate context
  (``context=None``: the attention then attends to ``x``);
* a forward pre-hook on the root module starts a new "call" each time the UNet runs.

**Exact.** A cached projection is returned only for an input equal to the one it was computed from: same
shape, stride, dtype and device and the same values (``torch.equal``, checked once per UNet call for each
distinct context tensor), with the weight and bias unchanged (same memory and version counter). Then the
result is the bit pattern the Linear would compute again, since the same kernel runs on the same operands.
Anything else -- a new prompt, another batch size, a cast or moved or reloaded weight -- computes afresh and
replaces the entry. The cache is bypassed while gradients are recorded (training), so autograd sees the
ordinary graph.

Cost: one ``torch.equal`` over the context per distinct context tensor per UNet call, plus a reference copy
of each distinct context and the cached ``(2B, 77, C)`` projections (a few MiB for SD-1.5).

Callers must not change a context tensor in place *during* a UNet call (nothing in the SDK does). Between
calls anything goes: the equality check sees new values. :func:`uncache_context_projections` restores the
plain ``nn.Linear`` class and drops the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm_sdk.accel.cpu_prepack import PackedLinear, unpack_cpu_weights
from ldm_sdk.models.attention import BasicTransformerBlock, CrossAttention
from ldm_sdk.weight_stamps import tensor_version

__all__ = [
    "ContextCache",
    "ContextCachedLinear",
    "cache_context_projections",
    "context_cache_of",
    "uncache_context_projections",
]

#: distinct context values remembered at once (uncond + cond batch, a second prompt, per-block lists ...)
MAX_CONTEXTS = 4


def _layout(t: Tensor) -> tuple[object, ...]:
    return (t.shape, t.stride(), t.dtype, t.device)


def _param_key(p: Tensor | None) -> tuple[object, ...] | None:
    if p is None:
        return None
    return (p.data_ptr(), tensor_version(p), p.dtype, p.device, p.shape)


@dataclass
class CacheStats:
    """Counters of a :class:`ContextCache`: projection ``hits`` / ``misses``, ``value_checks`` (torch.equal
    runs), ``new_contexts`` (reference copies made)."""

    hits: int = 0
    misses: int = 0
    value_checks: int = 0
    new_contexts: int = 0


@dataclass(eq=False)
class ContextCache:
    """The shared state of one cached model: the distinct context values seen (private reference copies)
    and, for the current UNet call, which input tensors were already matched to one of them."""

    refs: list[tuple[tuple[object, ...], Tensor]] = field(default_factory=list)  # (layout, copy)
    stats: CacheStats = field(default_factory=CacheStats)
    layers: int = 0  # attention layers whose K/V projections it serves
    # id(input) -> (input, ref) for the current call; holding `input` keeps its id from being reused
    _matched: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def new_call(self, *_hook_args: object) -> None:
        """Forget which tensors were matched: the next call re-checks every context's values. Installed as
        the root module's forward pre-hook (a bound method, so the model still pickles and deep-copies)."""
        self._matched.clear()

    def canonical(self, x: Tensor) -> Tensor:
        """The reference copy of the context equal to ``x`` (same layout -- shape, strides, dtype, device --
        and values), made when there is none yet. Its identity keys the projections' cached outputs."""
        hit = self._matched.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        layout = _layout(x)
        for ref_layout, ref in self.refs:
            if ref_layout == layout:
                self.stats.value_checks += 1
                if torch.equal(ref, x):
                    self._matched[id(x)] = (x, ref)
                    return ref
        ref = x.detach().clone()  # the values; the layout is kept next to it (x may be an expanded view)
        self.refs.append((layout, ref))
        self.stats.new_contexts += 1
        if len(self.refs) > MAX_CONTEXTS:
            self.refs.pop(0)
        self._matched[id(x)] = (x, ref)
        return ref

    def clear(self) -> None:
        self.refs.clear()
        self._matched.clear()


class ContextCachedLinear(nn.Linear):
    """``nn.Linear`` that returns its previous output for an input equal to the previous one (see the module
    docstring). Made from an existing Linear by :func:`cache_context_projections` (class swap, same
    Parameters); ``context_cache`` is the model's shared :class:`ContextCache`. ``context_input`` is set by
    the owning attention's pre-hook: True while the attention was given a separate context (the cache is
    used only then; self-attention input changes every step)."""

    context_cache: ContextCache
    context_input: bool
    _cached: tuple[Tensor, tuple[object, ...], Tensor] | None  # (ref, weight/bias key, output)

    def forward(self, input: Tensor) -> Tensor:
        cache = self.__dict__.get("context_cache")
        if (
            cache is None
            or not self.__dict__.get("context_input", False)
            or (torch.is_grad_enabled() and (input.requires_grad or self.weight.requires_grad))
        ):
            return super().forward(input)
        ref = cache.canonical(input)
        key = (_param_key(self.weight), _param_key(self.bias))
        cached = self._cached
        if cached is not None and cached[0] is ref and cached[1] == key:
            cache.stats.hits += 1
            return cached[2]
        cache.stats.misses += 1
        out = super().forward(input)
        self._cached = (ref, key, out)
        return out


_ATTR = "_ldm_context_cache"


def context_cache_of(model: nn.Module) -> ContextCache | None:
    """The :class:`ContextCache` that :func:`cache_context_projections` attached to ``model`` (or None)."""
    entry = model.__dict__.get(_ATTR)
    return entry[0] if entry is not None else None


def _context_given(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """Pre-hook of a CrossAttention: mark its K/V Linears as fed a context (or not) for this call."""
    x = args[0] if args else kwargs.get("x")
    context = args[1] if len(args) > 1 else kwargs.get("context")
    given = isinstance(context, Tensor) and context is not x
    for lin in (module.to_k, module.to_v):  # type: ignore[union-attr]
        if isinstance(lin, ContextCachedLinear):
            lin.context_input = given


def _context_attentions(model: nn.Module) -> list[CrossAttention]:
    """The attentions that are given a context: ``attn2`` of every transformer block, ``attn1`` of a block
    with ``disable_self_attn``, and any CrossAttention outside a block (its call decides, see the hook)."""
    targets: list[CrossAttention] = []
    in_blocks: set[int] = set()
    for module in model.modules():
        if isinstance(module, BasicTransformerBlock):
            in_blocks.update((id(module.attn1), id(module.attn2)))
            targets.append(module.attn2)
            if module.disable_self_attn:
                targets.append(module.attn1)
    targets += [m for m in model.modules() if isinstance(m, CrossAttention) and id(m) not in in_blocks]
    return targets


def cache_context_projections(model: nn.Module) -> ContextCache:
    """Cache the context K/V projections of every cross-attention in ``model`` (in place; see the module
    docstring). Idempotent: a second call returns the existing cache. Returns the shared cache (its
    ``stats`` count hits and misses, ``layers`` the attentions it serves)."""
    existing = context_cache_of(model)
    if existing is not None:
        return existing
    cache = ContextCache()
    handles = []
    for module in _context_attentions(model):
        for lin in (module.to_k, module.to_v):
            if type(lin) is PackedLinear:  # computed once per context: no need for a packed weight
                unpack_cpu_weights(lin)
            if type(lin) is nn.Linear:
                lin.__class__ = ContextCachedLinear
            if isinstance(lin, ContextCachedLinear):
                lin.context_cache = cache
                lin.context_input = False
                lin._cached = None
        handles.append(module.register_forward_pre_hook(_context_given, with_kwargs=True))
        cache.layers += 1
    handles.append(model.register_forward_pre_hook(cache.new_call))
    model.__dict__[_ATTR] = (cache, handles)
    return cache


def uncache_context_projections(model: nn.Module) -> None:
    """Undo :func:`cache_context_projections`: plain ``nn.Linear`` classes again, cache and hooks dropped."""
    entry = model.__dict__.pop(_ATTR, None)
    if entry is not None:
        cache, handles = entry
        for handle in handles:
            handle.remove()
        cache.clear()
    for module in model.modules():
        if isinstance(module, ContextCachedLinear):
            module.__class__ = nn.Linear
            for name in ("context_cache", "context_input", "_cached"):
                module.__dict__.pop(name, None)
