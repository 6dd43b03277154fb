"""Nearest 2x upsampling + 3x3 convolution as four 2x2 convolutions on the small map (sub-pixel form).

Why: after a nearest upsampling each 2x2 block of the big map repeats one pixel, so of the nine taps of the
3x3 kernel at an output pixel, those landing on the same input pixel can be summed first. Output pixel
``(2i + a, 2j + b)`` sees input rows ``i - 1 + a`` and ``i + a`` and columns ``j - 1 + b`` and ``j + b``,
with the kernel's rows combined as ``[W0, W1 + W2]`` (``a = 0``) or ``[W0 + W1, W2]`` (``a = 1``), columns
alike. Four 2x2 convolutions on the input (16 taps per input pixel instead of 36) replace the upsampling
copy and the 3x3 convolution on the 4x bigger map; the phases are written interleaved into the output.
The kl-f8 decoder does three such convolutions, up to 512 x 512 x 256: its decode went from 7.22 / 7.32
to 6.69 / 6.66 ms (H100, fp16, graph-replayed, two runs each, ``bench/probe_backends.py --no-subpixel``).
Only the first stage's ``Upsample`` is switched: the combined kernels are formed on every call (so they can
never be stale, also inside a CUDA graph), which costs more than it saves for the UNet's 1280-channel
convolutions on 8-32 pixel maps (the SD-1.5 step went from 6.53 to 8.16 ms when they were included).

Numerics: exact in real arithmetic. The combined kernels are formed in float32 from the weights on every
call (so they are never stale) and rounded once to the weights' dtype; the convolutions accumulate in
float32 as before. The output differs from the upsample-then-convolve path by float32 evaluation order
(float32 models) or by about one half-precision rounding (fp16 / bf16).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.models import autoencoder


def _combine(w: Tensor, dim: int) -> Tensor:
    """Along ``dim`` (size 3) -> a new dim of size 2 after the phase dim: ``[[W0, W1 + W2], [W0 + W1, W2]]``
    (phase 0, phase 1) on a new leading axis. Device ops only: capturable, no host-to-device copy."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)])


def phase_kernels(weight: Tensor) -> Tensor:
    """``(2, 2, C_out, C_in, 2, 2)``: the 2x2 kernel of each output phase ``(a, b)``, in float32 (float64
    for float64 weights)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    rows = _combine(w, 2)  # (a, C_out, C_in, 2, 3)
    return _combine(rows, 4).transpose(0, 1)  # (b, a, ...) -> (a, b, C_out, C_in, 2, 2)


def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3
    ``weight``, computed in the sub-pixel form (see the module doc); the output has ``x``'s memory format."""
    n, _, h, w = x.shape
    kernels = phase_kernels(weight).to(weight.dtype)
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    out = torch.empty((n, weight.shape[0], 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=fmt)
    for a in (0, 1):
        for b in (0, 1):
            full = F.conv2d(x, kernels[a, b], bias, padding=1)  # (h + 1) x (w + 1)
            out[:, :, a::2, b::2] = full[:, :, a : a + h, b : b + w]
    return out


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _conv3x3(conv: nn.Module | None) -> bool:
    """A plain 3x3, stride-1, padding-1, zero-padded, ungrouped, undilated ``nn.Conv2d``."""
    if type(conv) is not nn.Conv2d:
        return False
    c = cast(nn.Conv2d, conv)
    return (
        c.kernel_size == (3, 3)
        and c.stride == (1, 1)
        and c.padding == (1, 1)
        and c.dilation == (1, 1)
        and c.groups == 1
        and c.padding_mode == "zeros"
    )


class FusedFirstStageUpsample(autoencoder.Upsample):
    """The first stage's ``Upsample`` (with its conv) in the sub-pixel form; other inputs (training, not
    4-D) take the original path."""

    unfused_class: ClassVar[type[nn.Module]] = autoencoder.Upsample

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dim() != 4:
            return autoencoder.Upsample.forward(self, x)
        return upsample_conv(x, self.conv.weight, self.conv.bias)


def first_stage_upsample_fusable(module: autoencoder.Upsample) -> str | None:
    if not module.with_conv or not _conv3x3(getattr(module, "conv", None)):
        return "not followed by a plain 3x3 conv"
    return None


__all__ = [
    "FusedFirstStageUpsample",
    "first_stage_upsample_fusable",
    "phase_kernels",
    "upsample_conv",
]
