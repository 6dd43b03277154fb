"""Helpers the text-encoder tests share: random weights and the batch-independence check."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def randomize(module: torch.nn.Module, seed: int = 0, *, scale: float) -> None:
    """Every parameter random: matrices ``N(0, scale^2)``, vectors ``1 + N(0, 0.25)`` (norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(
                torch.randn(p.shape, generator=g) * (scale if p.ndim > 1 else 0.5)
                + (1.0 if p.ndim == 1 else 0)
            )


def check_deterministic_and_batch_independent(enc: Callable[[Sequence[str]], Tensor], atol: float) -> None:
    """The same prompts give the same output; each item of a batch equals its single run (within
    ``atol``); different prompts give different outputs."""
    both = enc(["a", "b"])
    assert torch.equal(both, enc(["a", "b"]))
    torch.testing.assert_close(both[0:1], enc(["a"]), atol=atol, rtol=0)
    torch.testing.assert_close(both[1:2], enc(["b"]), atol=atol, rtol=0)
    assert not torch.allclose(both[0], both[1])
