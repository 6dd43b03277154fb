"""Encoded prompts kept for reuse: a repeated prompt, and the negative prompt of every guided run (``""`` by
default), go through the text encoder once.

An editing session reruns one prompt with new seeds, masks and strengths many times; each run used to
encode its prompt and its negative prompt afresh (two passes of CLIP ViT-L/14's text tower: about a tenth of
a 10-step fp32 CPU txt2img at 256 px, ``docs/performance-log.md``). The :class:`~ldm_sdk.runtime.Runtime`
owns one :class:`PromptCache` (``Runtime(prompt_cache_size=)``, ``$LDM_SDK_PROMPT_CACHE``; 0 turns it off)
and the tasks encode through it.

What a hit returns is exactly what the encoder returned for that prompt: the same tensor object, shared by
every run that hits it (do not modify it in place). Entries are kept per encoder (held weakly: an encoder
that goes away takes its entries with it) and are dropped when the encoder's weights change: each lookup
compares every parameter's and buffer's address, in-place version, dtype and device with those at the time
of the encoding, so a dtype or device move, ``load_state_dict`` and an optimizer step all invalidate. An
encoder in training mode (dropout) is never cached. Least recently used prompts go first once
``capacity`` prompts of all encoders are kept.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ldm_sdk.weight_stamps import WeightsStamp, weights_stamp

__all__ = ["PromptCache", "PromptCacheStats"]

#: the default ``capacity``: prompts of all encoders together (a CLIP ViT-L/14 encoding is 77 x 768 values)
DEFAULT_CAPACITY = 32


@dataclass(frozen=True)
class PromptCacheStats:
    """Lookups answered from the cache (``hits``), encoded (``misses``, also those the cache was off for),
    entries dropped for room (``evictions``) or because their encoder's weights changed
    (``invalidations``), and entries kept."""

    hits: int
    misses: int
    evictions: int
    invalidations: int
    entries: int


class PromptCache:
    """Encoder outputs by prompt, for every encoder used with it (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 0:
            raise ValueError(f"prompt cache capacity must be >= 0 (0: off); got {capacity}")
        self.capacity = capacity
        self._stamps: weakref.WeakKeyDictionary[nn.Module, WeightsStamp] = weakref.WeakKeyDictionary()
        # (encoder ref, prompt) -> output, least recently used first
        self._entries: OrderedDict[tuple[weakref.ref[nn.Module], str], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._invalidations = 0

    def encode(self, encoder: nn.Module, prompt: str, compute: Callable[[], Tensor] | None = None) -> Tensor:
        """``encoder([prompt])`` (or ``compute()`` when given), from the cache when this encoder with these
        weights encoded ``prompt`` before. Off (capacity 0) or for an encoder in training mode: computed
        every time, nothing kept."""
        compute = compute or (lambda: encoder([prompt]))
        if self.capacity == 0 or encoder.training:
            with self._lock:
                self._misses += 1
            return compute()
        stamp = weights_stamp(encoder)
        key = (weakref.ref(encoder), prompt)
        with self._lock:
            if self._stamps.get(encoder) != stamp:
                self._forget(encoder)
            elif key in self._entries:
                self._hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
            self._misses += 1
        out = compute()  # outside the lock: another thread may encode meanwhile; both results are equal
        with self._lock:
            if self._stamps.get(encoder, stamp) != stamp:
                self._forget(encoder)
            self._stamps[encoder] = stamp
            self._entries[key] = out
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self._evictions += 1
        return out

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._stamps.clear()

    def stats(self) -> PromptCacheStats:
        with self._lock:
            self._drop_dead()
            return PromptCacheStats(
                self._hits, self._misses, self._evictions, self._invalidations, len(self._entries)
            )

    def __len__(self) -> int:
        return self.stats().entries

    def __repr__(self) -> str:
        s = self.stats()
        return f"PromptCache(capacity={self.capacity}, entries={s.entries}, hits={s.hits}, misses={s.misses})"

    def _forget(self, encoder: nn.Module) -> None:
        """Drop ``encoder``'s entries (its weights changed); under the lock."""
        stale = [k for k in self._entries if k[0]() is encoder]
        for k in stale:
            del self._entries[k]
        self._invalidations += len(stale)
        self._stamps.pop(encoder, None)
        self._drop_dead()

    def _drop_dead(self) -> None:
        """Drop the entries of encoders that no longer exist; under the lock."""
        for k in [k for k in self._entries if k[0]() is None]:
            del self._entries[k]
