"""Where sampling's random numbers come from: one ``torch.Generator`` for the whole state, or one per batch
item (:class:`ItemGenerators`).

A batch sampled together (a task's ``batch_mode="together"``) still gives each item the noise of its own
single run: with :class:`ItemGenerators`, item ``i`` draws every random number from generator ``i`` -- the
starting noise, each noisy step's noise, the masked denoiser's forward-process noise -- in the order and
amounts the single run with that generator draws them. :func:`randn` is the one place that draws;
samplers draw through :func:`ldm_sdk.samplers.base.randn_like_state`, which calls it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["ItemGenerators", "RandomSource", "randn", "random_state", "restore_random_state"]


class ItemGenerators:
    """One ``torch.Generator`` per batch item, in batch order."""

    def __init__(self, generators: Iterable[torch.Generator]) -> None:
        self.generators: tuple[torch.Generator, ...] = tuple(generators)
        if not self.generators:
            raise ValueError("ItemGenerators needs at least one generator")
        for g in self.generators:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"ItemGenerators takes torch.Generator objects, got {type(g).__name__}")

    def __len__(self) -> int:
        return len(self.generators)

    def __iter__(self) -> Iterator[torch.Generator]:
        return iter(self.generators)

    def __repr__(self) -> str:
        return f"ItemGenerators({len(self)} on {self.generators[0].device})"


#: what samplers, masked denoisers and the tasks draw from
RandomSource = torch.Generator | ItemGenerators


def randn(
    shape: Sequence[int], generator: RandomSource | None, *, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``, drawn on the generator's device.

    With :class:`ItemGenerators` the first dimension is the batch: item ``i`` is ``randn((1, *shape[1:]))``
    from generator ``i``, the same numbers a single run of batch 1 with that generator draws.
    """
    if isinstance(generator, ItemGenerators):
        if not shape or shape[0] != len(generator):
            raise ValueError(
                f"{len(generator)} item generators cannot draw noise of shape {tuple(shape)}: its first "
                "dimension must be the batch, one item per generator"
            )
        item = (1, *shape[1:])
        parts = [torch.randn(item, generator=g, device=g.device, dtype=dtype).to(device) for g in generator]
        return torch.cat(parts)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def random_state(source: RandomSource | None) -> list[Tensor]:
    """Where ``source`` stands: each generator's state (none for ``None``), for
    :func:`restore_random_state` -- a run repeated from there draws the same numbers."""
    if source is None:
        return []
    return [g.get_state() for g in (source if isinstance(source, ItemGenerators) else (source,))]


def restore_random_state(source: RandomSource | None, state: list[Tensor]) -> None:
    """Put ``source`` back where :func:`random_state` found it."""
    generators = [] if source is None else list(source if isinstance(source, ItemGenerators) else (source,))
    if len(generators) != len(state):
        raise ValueError(f"a state of {len(state)} generator(s) cannot restore {len(generators)}")
    for g, saved in zip(generators, state, strict=True):
        g.set_state(saved)
