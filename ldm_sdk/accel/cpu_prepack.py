"""Convolution and Linear weights reordered once for oneDNN / MKL (CPU inference), instead of at every call.

An eager CPU ``F.conv2d`` hands oneDNN a plain (channels_last or NCHW) weight, which oneDNN reorders into its
blocked layout on every call; a bf16 ``F.linear`` does the same, an fp32 one packs for MKL. For the small
feature maps of a UNet's inner levels that reorder is a large share of the call (bf16, 256 channels at 4x4:
355 us eager, 194 us with the weight reordered once, on the development VM). :func:`prepack_cpu_weights`
does what ``torch._inductor``'s freezing pass does for convolutions and linears, without compiling:

* every ``nn.Conv2d`` (zero padding, numeric padding) becomes a :class:`PackedConv2d` and every
  ``nn.Linear`` a :class:`PackedLinear` -- subclasses made by a class swap, with the *same* Parameters, so
  ``state_dict()``, ``parameters()`` and module paths are unchanged;
* on its first inference call a packed module reorders its weight (``torch.ops.mkldnn._reorder_*``, or
  ``torch.ops.mkl._mkl_reorder_linear_weight`` for fp32 Linear) and then calls the prepacked kernel
  (``mkldnn._convolution_pointwise`` / ``mkldnn._linear_pointwise`` / ``mkl._mkl_linear``), the ops the
  inductor CPU backend emits;
* the packed copy is made again when the weight changes (new memory, dtype or version counter: ``.to()``,
  ``load_state_dict``, an in-place edit) and is not used while gradients are recorded, for CUDA / other
  devices, for dtypes other than fp32 / bf16, or for a Conv2d whose weight is not channels_last (the packed
  kernel computes in channels_last; see below). Those calls take the plain ``nn.Conv2d`` / ``nn.Linear``
  forward.

**Exact.** The prepacked kernels are the ones the eager ops dispatch to, given the weight already in the
layout they would reorder it to, so outputs are bit-identical to the eager module with a channels_last weight
(:func:`~ldm_sdk.accel.cpu.configure_cpu_inference` makes them channels_last); ``tests/accel`` checks this
per layer and for a whole UNet in bf16 and fp32. The output of a packed convolution is channels_last, as the
eager one is for a channels_last weight.

**Memory.** The packed copy lives next to the Parameter (which ``state_dict`` and the rest of the SDK keep
using): the converted modules' weight memory is held twice. :func:`unpack_cpu_weights` drops the copies and
restores the plain classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm_sdk.weight_stamps import tensor_version

__all__ = [
    "PackedConv2d",
    "PackedLinear",
    "PrepackReport",
    "packable_bytes",
    "physical_memory_bytes",
    "prepack_available",
    "prepack_cpu_weights",
    "unpack_cpu_weights",
]

_DTYPES = (torch.float32, torch.bfloat16)


def prepack_available() -> bool:
    """Whether this torch build has the oneDNN / MKL prepacked ops (x86 builds with mkldnn and MKL)."""
    try:
        ops = (
            torch.ops.mkldnn._reorder_convolution_weight,
            torch.ops.mkldnn._convolution_pointwise,
            torch.ops.mkldnn._reorder_linear_weight,
            torch.ops.mkldnn._linear_pointwise,
            torch.ops.mkl._mkl_reorder_linear_weight,
            torch.ops.mkl._mkl_linear,
        )
    except (AttributeError, RuntimeError):
        return False
    return bool(ops) and torch.backends.mkldnn.is_available() and torch.backends.mkl.is_available()


def _weight_key(w: Tensor) -> tuple[object, ...]:
    return (w.data_ptr(), tensor_version(w), w.dtype, w.shape, w.stride())


def _usable(module: nn.Module, x: Tensor) -> bool:
    w = module.weight  # type: ignore[union-attr]
    return (
        x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype == w.dtype
        and w.dtype in _DTYPES
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    )


class PackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing with a weight reordered once for oneDNN (see the module docstring)."""

    _pack: tuple[tuple[object, ...], Tensor] | None

    def forward(self, input: Tensor) -> Tensor:
        w = self.weight
        if (
            not _usable(self, input)
            or input.ndim != 4
            or not w.is_contiguous(memory_format=torch.channels_last)
            # a 1x1 weight is both layouts at once: the eager op then goes by the input's layout
            or (w.is_contiguous() and not input.is_contiguous(memory_format=torch.channels_last))
        ):
            return super().forward(input)
        key = _weight_key(w)
        pack = self.__dict__.get("_pack")
        if pack is None or pack[0] != key:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                w, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(input.shape)
            )
            pack = self.__dict__["_pack"] = (key, packed)
        return torch.ops.mkldnn._convolution_pointwise(
            input,
            pack[1],
            self.bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            "none",
            [],
            "",
        )


class PackedLinear(nn.Linear):
    """``nn.Linear`` computing with a weight packed once for oneDNN (bf16) or MKL (fp32)."""

    _pack: tuple[tuple[object, ...], Tensor] | None

    def forward(self, input: Tensor) -> Tensor:
        if not _usable(self, input) or input.ndim < 2 or input.numel() == 0:
            return super().forward(input)
        w = self.weight
        key = _weight_key(w)
        pack = self.__dict__.get("_pack")
        rows = input.numel() // input.shape[-1]
        if w.dtype == torch.bfloat16:
            if pack is None or pack[0] != key:
                pack = self.__dict__["_pack"] = (key, torch.ops.mkldnn._reorder_linear_weight(w, None))
            return torch.ops.mkldnn._linear_pointwise(input, pack[1], self.bias, "none", [], "")
        # fp32: MKL's packed sgemm; the pack is made for a batch size (rows), re-made when that changes
        key = (*key, rows)
        if pack is None or pack[0] != key:
            pack = self.__dict__["_pack"] = (key, torch.ops.mkl._mkl_reorder_linear_weight(w, rows))
        return torch.ops.mkl._mkl_linear(input, pack[1], w, self.bias, rows)


@dataclass(frozen=True)
class PrepackReport:
    """What :func:`prepack_cpu_weights` converted."""

    convs: int
    linears: int
    skipped: tuple[str, ...]  # module paths left plain, with the reason

    def describe(self) -> str:
        return f"prepacked weights: {self.convs} Conv2d, {self.linears} Linear" + (
            f" ({len(self.skipped)} left plain)" if self.skipped else ""
        )


def packable_bytes(*models: nn.Module) -> int:
    """Bytes of the weights :func:`prepack_cpu_weights` would hold a second copy of: those of the plain
    ``nn.Conv2d`` / ``nn.Linear`` layers of ``models``, each weight once."""
    seen: set[int] = set()
    total = 0
    for model in models:
        for module in model.modules():
            if type(module) in (nn.Conv2d, nn.Linear) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                total += module.weight.numel() * module.weight.element_size()
    return total


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say (``os.sysconf``)."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def prepack_cpu_weights(*models: nn.Module, exclude: Iterable[type[nn.Module]] = ()) -> PrepackReport:
    """Convert every plain ``nn.Conv2d`` / ``nn.Linear`` of ``models`` in place (see the module docstring).

    Subclasses of ``nn.Conv2d`` / ``nn.Linear`` with their own forward are left alone (their class is not
    exactly ``nn.Conv2d`` / ``nn.Linear``), and so are children of modules whose type is in ``exclude``.
    Idempotent. Packing happens lazily, on each module's first inference call.
    """
    if not prepack_available():
        raise RuntimeError(
            "this torch build lacks the oneDNN / MKL prepacked ops (mkldnn and MKL are needed)"
        )
    excluded = tuple(exclude)
    convs = linears = 0
    skipped: list[str] = []
    for model in models:
        banned: set[int] = set()
        for module in model.modules():
            if excluded and isinstance(module, excluded):
                banned.update(id(m) for m in module.modules())
        for name, module in model.named_modules():
            if id(module) in banned:
                continue
            if type(module) is nn.Conv2d:
                if module.padding_mode != "zeros" or isinstance(module.padding, str):
                    skipped.append(f"{name} (padding {module.padding!r}, mode {module.padding_mode})")
                    continue
                module.__class__ = PackedConv2d
                module.__dict__["_pack"] = None
            elif type(module) is nn.Linear:
                module.__class__ = PackedLinear
                module.__dict__["_pack"] = None
            if isinstance(module, PackedConv2d):
                convs += 1
            elif isinstance(module, PackedLinear):
                linears += 1
    return PrepackReport(convs, linears, tuple(skipped))


def unpack_cpu_weights(*models: nn.Module) -> None:
    """Undo :func:`prepack_cpu_weights`: plain ``nn.Conv2d`` / ``nn.Linear`` again, packed copies dropped."""
    for model in models:
        for module in model.modules():
            if type(module) is PackedConv2d:
                module.__class__ = nn.Conv2d
            elif type(module) is PackedLinear:
                module.__class__ = nn.Linear
            else:
                continue
            module.__dict__.pop("_pack", None)
