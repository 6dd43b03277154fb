"""The prompt cache: a hit is the encoder's own output for that prompt; weights changes, training mode,
capacity and dead encoders are honoured. The reference is always a direct call of the encoder."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.encoders.prompt_cache import PromptCache
from ldm_sdk.weight_stamps import tensor_version, weights_stamp


class CountingEncoder(nn.Module):
    """A text encoder whose output depends on the prompt and on its weights; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(128, 4, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("scale", torch.tensor(2.0))
        self.calls = 0
        self.eval()

    def forward(self, texts: list[str]) -> Tensor:
        self.calls += 1
        codes = torch.tensor([[ord(c) % 128 for c in t] or [0] for t in texts])
        return self.table[codes].sum(dim=1, keepdim=True) * self.scale


def test_hits_return_the_encoders_output_and_skip_the_encoder() -> None:
    enc, cache = CountingEncoder(), PromptCache(4)
    a = cache.encode(enc, "a red boat")
    assert torch.equal(a, enc(["a red boat"]))
    calls = enc.calls
    assert cache.encode(enc, "a red boat") is a and enc.calls == calls
    empty = cache.encode(enc, "")
    assert torch.equal(empty, enc([""]))
    s = cache.stats()
    assert (s.hits, s.misses, s.entries) == (1, 2, 2)


def test_least_recently_used_prompt_goes_first() -> None:
    enc, cache = CountingEncoder(), PromptCache(2)
    cache.encode(enc, "a")
    cache.encode(enc, "b")
    cache.encode(enc, "a")  # a is now the most recent
    cache.encode(enc, "c")  # evicts b
    assert cache.stats().evictions == 1
    calls = enc.calls
    cache.encode(enc, "a")
    assert enc.calls == calls  # kept
    cache.encode(enc, "b")
    assert enc.calls == calls + 1  # was evicted


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "cast", "buffer"])
def test_changed_weights_invalidate(change: str) -> None:
    enc, cache = CountingEncoder(), PromptCache(4)
    before = cache.encode(enc, "a cat")
    cache.encode(enc, "a dog")
    with torch.no_grad():
        if change == "in_place":
            enc.table.mul_(-1)
        elif change == "load_state_dict":
            enc.load_state_dict({"table": enc.table * 3, "scale": enc.scale})
        elif change == "cast":
            enc.double()
        else:
            enc.scale.fill_(5.0)
    after = cache.encode(enc, "a cat")
    assert torch.equal(after, enc(["a cat"])) and not torch.equal(after.double(), before.double())
    s = cache.stats()
    assert s.invalidations == 2 and s.entries == 1 and s.misses == 3


def test_training_mode_and_capacity_zero_compute_every_time() -> None:
    enc = CountingEncoder().train()
    cache = PromptCache(4)
    cache.encode(enc, "x")
    cache.encode(enc, "x")
    assert enc.calls == 2 and cache.stats().entries == 0 and cache.stats().misses == 2
    off, enc = PromptCache(0), CountingEncoder()
    assert torch.equal(off.encode(enc, "x"), off.encode(enc, "x")) and enc.calls == 2
    assert off.stats().entries == 0
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        PromptCache(-1)


def test_encoders_are_kept_apart_and_held_weakly() -> None:
    a, b, cache = CountingEncoder(), CountingEncoder(), PromptCache(8)
    with torch.no_grad():
        b.table.mul_(2)
    ya, yb = cache.encode(a, "same"), cache.encode(b, "same")
    assert torch.equal(yb, 2 * ya) and cache.stats().entries == 2
    del b
    gc.collect()
    assert cache.stats().entries == 1
    cache.clear()
    assert len(cache) == 0


def test_a_custom_compute_is_cached_under_the_prompt() -> None:
    enc, cache = CountingEncoder(), PromptCache(4)
    y = cache.encode(enc, "p", lambda: enc(["p"]) + 1)
    assert cache.encode(enc, "p") is y and enc.calls == 1


def test_concurrent_lookups_agree() -> None:
    enc, cache = CountingEncoder(), PromptCache(64)
    prompts = [f"prompt {i % 8}" for i in range(64)]
    out: dict[int, Tensor] = {}

    def work(i: int) -> None:
        out[i] = cache.encode(enc, prompts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], enc([p]))
    assert cache.stats().entries == 8


def test_weights_stamp_sees_addresses_and_versions() -> None:
    enc = CountingEncoder()
    stamp = weights_stamp(enc)
    assert weights_stamp(enc) == stamp
    v = tensor_version(enc.table)
    with torch.no_grad():
        enc.table.add_(0)
    assert tensor_version(enc.table) == v + 1 and weights_stamp(enc) != stamp
    with torch.inference_mode():
        made = torch.ones(2)
    assert tensor_version(made) == -1
