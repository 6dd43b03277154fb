"""Work of a captured network call that depends on the conditioning alone, run once per conditioning.

Why: a sampler calls the network with the same prompt embeddings at every step of a request, yet a graph
of the whole call recomputes what follows from them alone at every replay. In SD-1.5 that is the
cross-attentions' one K / V projection of the context (:mod:`ldm_sdk.accel.context_projections`): 23 us
of a 5.4 ms guided step at batch 2 on an H100, on the step's critical path, 50 times per image.

How: a module that can take such work out of its call carries a :class:`ConditioningPrologue` as its
``conditioning_prologue`` attribute (:func:`find_prologues` collects them from the watched modules and
their submodules). :class:`~ldm_sdk.accel.graphs.CapturedModel` then captures two graphs per signature:
the prologues' :meth:`~ConditioningPrologue.compute` on the static conditioning buffers, and the call
itself inside :meth:`~ConditioningPrologue.holding` their results, so the call reads them instead of
recomputing them. It replays the first graph only when the conditioning was copied in anew. The call's
work is the same kernels on the same inputs in both forms: the same bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from ldm_sdk.diffusion.conditioning import Conditioning


@runtime_checkable
class ConditioningPrologue(Protocol):
    """What a module's call computes from the conditioning alone, taken out of the call."""

    def compute(self, cond: Conditioning) -> Tensor | None:
        """The conditioning-only result for ``cond``, or None when it does not apply to these tensors
        (another dtype or device than the module's weights, a missing part): the call then computes what
        it needs itself."""
        ...

    def holding(self, cond: Conditioning, result: Tensor) -> AbstractContextManager[None]:
        """Within the context, the module's call with exactly ``cond``'s tensors uses ``result`` (from
        :meth:`compute` on them) instead of computing it."""
        ...


def find_prologues(modules: Sequence[nn.Module]) -> list[ConditioningPrologue]:
    """The distinct ``conditioning_prologue`` objects of ``modules`` and their submodules, in module order."""
    found: list[ConditioningPrologue] = []
    for module in modules:
        for sub in module.modules():
            prologue = sub.__dict__.get("conditioning_prologue")
            if prologue is None:
                continue
            if not isinstance(prologue, ConditioningPrologue):
                raise TypeError(
                    f"{type(sub).__name__}.conditioning_prologue must have compute(cond) and "
                    f"holding(cond, result), got {type(prologue).__name__}"
                )
            if all(prologue is not seen for seen in found):
                found.append(prologue)
    return found


class PrologueResults:
    """The results of ``prologues`` for one set of static conditioning buffers (those that apply)."""

    def __init__(self, prologues: Sequence[ConditioningPrologue], cond: Conditioning) -> None:
        self.cond = cond
        self.results: list[tuple[ConditioningPrologue, Tensor]] = []
        for prologue in prologues:
            result = prologue.compute(cond)
            if result is not None:
                self.results.append((prologue, result))

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Every result held for the call (see :meth:`ConditioningPrologue.holding`)."""
        with contextlib.ExitStack() as stack:
            for prologue, result in self.results:
                stack.enter_context(prologue.holding(self.cond, result))
            yield


__all__ = ["ConditioningPrologue", "PrologueResults", "find_prologues"]
