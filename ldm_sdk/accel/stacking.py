"""Parameters moved back to back into one storage, so that one GEMM (or one add) can read several of them
as a single tensor without a copy per call.

:func:`stack_storage` moves the values of several Parameters (same trailing shape, dtype and device) into
one new storage, concatenated along dim 0; each Parameter stays the same object, now a view of that storage,
so state dicts, ``load_state_dict`` (in place) and optimisers see no difference. :func:`stacked_view` returns
the concatenation as a view while the Parameters still lie that way, and None once one of them got new
memory (``module.to(...)``, assignment of ``.data``), so callers fall back to the separate tensors.

Used by :mod:`ldm_sdk.accel.block_fusion` (the q / k / v projection weights of an attention) and
:mod:`ldm_sdk.accel.time_embedding` (every residual block's time-embedding projection of a UNet).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def stack_storage(params: Sequence[Tensor]) -> None:
    """Move ``params`` into one new storage, back to back along dim 0 (values unchanged)."""
    if not params:
        raise ValueError("stack_storage needs at least one tensor")
    first = params[0]
    for p in params:
        if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype or p.device != first.device:
            raise ValueError(
                "stack_storage takes tensors of one trailing shape, dtype and device; got "
                f"{tuple(first.shape)} {first.dtype} {first.device} and {tuple(p.shape)} {p.dtype} {p.device}"
            )
    with torch.no_grad(), torch.inference_mode(False):
        stacked = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            rows = p.shape[0]
            p.data = stacked[start : start + rows]
            start += rows


def stacked_view(params: Sequence[Tensor]) -> Tensor | None:
    """The concatenation of ``params`` along dim 0 as a view, when they lie back to back in one storage (as
    :func:`stack_storage` leaves them), contiguous; else None."""
    first = params[0]
    ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in params:
        if p.untyped_storage().data_ptr() != ptr or not p.is_contiguous() or p.storage_offset() != offset:
            return None
        if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in params)
    shape = (rows, *first.shape[1:])
    return first.detach().as_strided(shape, first.stride(), first.storage_offset())


__all__ = ["stack_storage", "stacked_view"]
