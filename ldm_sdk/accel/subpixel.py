"""Nearest 2x upsampling + 3x3 convolution as four 2x2 convolutions on the small map (sub-pixel form).

Why: after a nearest upsampling each 2x2 block of the big map repeats one pixel, so of the nine taps of the
3x3 kernel at an output pixel, those landing on the same input pixel can be summed first. Output pixel
``(2i + a, 2j + b)`` sees input rows ``i - 1 + a`` and ``i + a`` and columns ``j - 1 + b`` and ``j + b``,
with the kernel's rows combined as ``[W0, W1 + W2]`` (``a = 0``) or ``[W0 + W1, W2]`` (``a = 1``), columns
alike. Four 2x2 convolutions on the input (16 taps per input pixel instead of 36) replace the upsampling
copy and the 3x3 convolution on the 4x bigger map. They run as one convolution with the four phases'
kernels stacked as ``4 C_out`` output channels, and one Triton kernel interleaves its output into the big
channels_last map (four strided copies elsewhere; those ran at ~0.9 TB/s and took 0.5 ms of the decode).
The kl-f8 decoder does three such convolutions, up to 512 x 512 x 256: its decode went from 7.22 / 7.32
to 6.69 / 6.66 ms (H100, fp16, graph-replayed, two runs each, ``bench/probe_backends.py --no-subpixel``).
Only the first stage's ``Upsample`` is switched: the combined kernels are formed on every call (so they can
never be stale, also inside a CUDA graph), which costs more than it saves for the UNet's 1280-channel
convolutions on 8-32 pixel maps (the SD-1.5 step went from 6.53 to 8.16 ms when they were included). On
the Triton path one kernel forms them, in the convolution's channels_last layout (the torch form took about
40 small launches per convolution), and the interleave adds the bias (cuDNN adds a convolution's bias in a
pass of its own over the output: 0.33 ms of the 512 px decode on an H100, ``bench/op_roofline.py``).

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

from ldm_sdk.accel.conv_checks import plain_conv
from ldm_sdk.accel.implicit_conv import handoff_groups, upsample_conv_fits, upsample_conv_fused
from ldm_sdk.accel.norm_handoff import NormHandoff, wants_stats
from ldm_sdk.accel.triton_kernels import (
    KERNEL_DTYPES,
    Backend,
    KernelRecorder,
    StatsSource,
    _nhwc_statistics,
    _pow2,
    _use_triton,
    _warps,
    default_plan,
    launch,
    launch_over_pixels,
    triton,
)
from ldm_sdk.models import autoencoder

INTERLEAVE_TILE = 4096
"""Elements per program of the phase interleave."""
PHASE_BLOCK = 256
"""Input channels per program of the phase-kernel kernel."""
SUBPIXEL_MIN_WIDTH = 128
"""Narrowest small map where the phases' convolution, interleave, bias and statistics run as one kernel of
our own (:func:`~ldm_sdk.accel.implicit_conv.upsample_conv_fused`) rather than cuDNN + the interleave with
the statistics. H100, fp16, graph replay, with the phase kernels (``bench/bench_implicit_conv.py``,
``bench/results/bench_implicit_conv_upsample_h100.json``): 128 -> 256 px x 512 263.2 against 275.9 us,
256 -> 512 px x 256 312.9 against 340.0; 64 -> 128 px lost (109.6 against 95.9). The whole decode, nine
rounds alternating (``bench_implicit_conv_decode_ab_h100.json``): 5.065 ms with it and the residual
blocks' ``conv2`` as our own, 5.112 with the latter alone, 5.192 with neither (medians)."""


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


def upsample_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    backend: Backend = "auto",
    recorder: KernelRecorder | None = None,
    handoff: NormHandoff | None = None,
    implicit: bool = True,
) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` for a 3x3
    ``weight``, computed in the sub-pixel form (see the module doc); the output has ``x``'s memory format.
    The four phases' 2x2 kernels run as one convolution with ``4 C_out`` output channels; ``backend`` picks
    how its output is interleaved into the big map: the Triton kernel (channels_last CUDA maps, ``"auto"``)
    or four strided copies (anything else, ``"reference"``). With ``handoff`` (a GroupNorm reads the output
    next) the Triton interleave runs as that norm's statistics kernel and offers it the statistics
    (:mod:`ldm_sdk.accel.norm_handoff`). With ``implicit`` (on Hopper, small maps at least
    :data:`SUBPIXEL_MIN_WIDTH` wide) the convolution, the interleave, the bias and the statistics are one
    kernel of our own instead (:func:`~ldm_sdk.accel.implicit_conv.upsample_conv_fused`)."""
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    fits = _channels_last(x) and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype
    if backend == "triton" and not fits:
        raise ValueError(
            "the Triton sub-pixel kernels take channels_last fp16 / bf16 / fp32 maps with weights of the "
            f"map's dtype, got a {'channels_last' if _channels_last(x) else 'non-channels_last'} "
            f"{x.dtype} map and {weight.dtype} weights; use backend='auto'"
        )
    if fits and _use_triton(backend, "subpixel", x, weight, bias):
        kernels = _phase_kernels_triton(weight, recorder)
        if implicit and w >= SUBPIXEL_MIN_WIDTH and upsample_conv_fits(x, weight) is None:
            groups = handoff_groups(handoff, (n, c_out, 2 * h, 2 * w))
            out, stats = upsample_conv_fused(x, kernels, bias, stats_groups=groups, recorder=recorder)
            if stats is not None:
                cast(NormHandoff, handoff).offer(out, stats)
            return out
        full = F.conv2d(x, kernels, None, padding=1)  # the bias is added by the interleave
        full = full.contiguous(memory_format=torch.channels_last)
        if wants_stats(handoff, (n, c_out, 2 * h, 2 * w)):
            return _interleave_with_stats(full, bias, c_out, h, w, cast(NormHandoff, handoff), recorder)
        return _interleave_triton(full, bias, c_out, h, w, recorder)
    kernels = phase_kernels(weight).to(weight.dtype).reshape(4 * c_out, weight.shape[1], 2, 2)  # phase 2a + b
    full = F.conv2d(x, kernels, bias.repeat(4) if bias is not None else None, padding=1)  # (h + 1) x (w + 1)
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    out = torch.empty((n, c_out, 2 * h, 2 * w), device=x.device, dtype=full.dtype, memory_format=fmt)
    for a in (0, 1):
        for b in (0, 1):
            phase = full[:, (2 * a + b) * c_out : (2 * a + b + 1) * c_out]
            out[:, :, a::2, b::2] = phase[:, :, a : a + h, b : b + w]
    return out


def _phase_kernels_triton(weight: Tensor, recorder: KernelRecorder | None) -> Tensor:
    """:func:`phase_kernels` as the ``(4 C_out, C_in, 2, 2)`` convolution weight (phase ``2a + b`` major) in
    ``weight``'s dtype and channels_last strides, by one Triton kernel: the same float32 sums in the same
    order, rounded once (bit-identical to ``phase_kernels(weight).to(weight.dtype)``). The torch form took
    about 40 small launches per convolution (unbind, adds, stacks, casts, the layout copy)."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    out = torch.empty(
        (4 * c_out, c_in, 2, 2), device=weight.device, dtype=weight.dtype, memory_format=torch.channels_last
    )
    if out.numel() == 0:
        return out
    block = min(_pow2(c_in), PHASE_BLOCK)
    launch(
        _phase_kernels_kernel,
        (c_out, triton.cdiv(c_in, block)),
        recorder,
        weight,
        out,
        c_out,
        c_in,
        *weight.stride(),
        BLOCK=block,
        num_warps=_warps(block * 4),
    )
    return out


def _interleave_triton(
    full: Tensor, bias: Tensor | None, c_out: int, h: int, w: int, recorder: KernelRecorder | None
) -> Tensor:
    """The big map from the phases' channels_last ``(N, 4 C, h + 1, w + 1)`` output in one pass: output
    pixel ``(2i + a, 2j + b)`` takes channels ``[(2a + b) C, (2a + b + 1) C)`` of pixel ``(i + a, j + b)``,
    plus ``bias[c]`` (added in float32, rounded once)."""
    n = full.shape[0]
    out = _big_map(full, c_out, h, w)
    pixels = n * 4 * h * w
    if pixels == 0 or c_out == 0:
        return out
    launch_over_pixels(
        _interleave_phases_kernel,
        recorder,
        pixels,
        c_out,
        INTERLEAVE_TILE,
        full,
        bias if bias is not None else full,  # a dummy pointer when absent
        out,
        pixels,
        h,
        w,
        c_out,
        bias is not None,
    )
    return out


def _interleave_with_stats(
    full: Tensor,
    bias: Tensor | None,
    c_out: int,
    h: int,
    w: int,
    handoff: NormHandoff,
    recorder: KernelRecorder | None,
) -> Tensor:
    """:func:`_interleave_triton` written by the GroupNorm statistics kernel under the norm's own plan, its
    statistics offered to ``handoff``: the same output bits, and the norm skips its statistics pass."""
    out = _big_map(full, c_out, h, w)
    source = StatsSource(full, bias=bias, phases=(h, w))
    plan = default_plan(out, handoff.groups)
    handoff.offer(out, _nhwc_statistics(out, full, 0, False, plan, recorder, source=source))
    return out


def _big_map(full: Tensor, c_out: int, h: int, w: int) -> Tensor:
    """The uninitialised channels_last ``(N, C, 2h, 2w)`` output for the phases ``full``."""
    shape = (full.shape[0], c_out, 2 * h, 2 * w)
    return torch.empty(shape, device=full.device, dtype=full.dtype, memory_format=torch.channels_last)


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _conv3x3(conv: nn.Module | None) -> bool:
    """A plain 3x3, stride-1, padding-1, zero-padded, ungrouped, undilated ``nn.Conv2d``."""
    return plain_conv(conv, 3)


class FusedFirstStageUpsample(autoencoder.Upsample):
    """The first stage's ``Upsample`` (with its conv) in the sub-pixel form; other inputs (training, not
    4-D) take the original path."""

    unfused_class: ClassVar[type[nn.Module]] = autoencoder.Upsample
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    norm_handoff: NormHandoff | None = None  # shared with the decoder's norms (block_fusion.link_decoder)
    feeds_norm: bool = False  # the output goes straight into a norm: offer its statistics
    implicit_conv: bool = True  # upsample_conv's implicit= (our own convolution where it fits and pays)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dim() != 4:
            return autoencoder.Upsample.forward(self, x)
        return upsample_conv(
            x,
            self.conv.weight,
            self.conv.bias,
            backend=self.fusion_backend,
            recorder=self.kernel_recorder,
            handoff=self.norm_handoff if self.feeds_norm else None,
            implicit=self.implicit_conv,
        )


def first_stage_upsample_fusable(module: autoencoder.Upsample) -> str | None:
    if not module.with_conv or not _conv3x3(getattr(module, "conv", None)):
        return "not followed by a plain 3x3 conv"
    return None


if triton is not None:
    from ldm_sdk.kernels.subpixel import (
        _interleave_phases_kernel,
        _phase_kernels_kernel,
    )


__all__ = [
    "FusedFirstStageUpsample",
    "first_stage_upsample_fusable",
    "phase_kernels",
    "upsample_conv",
]
