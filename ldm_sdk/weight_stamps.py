"""What tells that a weight changed: the caches keyed on weights (the CPU K/V cache, prepacked CPU weights,
encoded prompts) compare these stamps instead of the values.

A tensor's memory address changes when it is replaced (a dtype or device move, ``module.to``, a new
``Parameter``); its version counter changes with every in-place write (``load_state_dict``, an optimizer
step, ``mul_``). An inference tensor (made under ``torch.inference_mode``) has no version counter and cannot
be written outside inference mode: for it only the address tells.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["WeightsStamp", "tensor_version", "weights_stamp"]

#: (address, version, dtype, device) of each parameter and buffer, in order
WeightsStamp = tuple[tuple[int, int, Any, Any], ...]


def tensor_version(t: Tensor) -> int:
    """``t``'s version counter (bumped by in-place writes); -1 for an inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


def weights_stamp(module: nn.Module) -> WeightsStamp:
    """Address, version, dtype and device of every parameter and buffer of ``module``, in order: equal
    stamps mean the same weights in the same memory, unchanged since."""
    tensors = [*module.parameters(), *module.buffers()]
    return tuple((t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in tensors)
