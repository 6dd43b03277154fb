"""Convolutions whose bias is added by the Triton bias pass instead of torch's broadcast ``add_``.

What: :class:`FusedBiasedConv2d` is an ``nn.Conv2d`` that, in eval mode on a channels_last CUDA input
Triton takes, runs the convolution without its bias and adds the bias with
:func:`~ldm_sdk.accel.residual_kernels.bias_residual_add` (one read and one write of the output, 16-byte
vector accesses over pixel rows). :func:`fuse_biased_convs` switches the convolutions that run through
their own ``forward`` in the fused networks -- the UNet's ``conv_in`` and its ``Downsample`` /
``Upsample`` convolutions, the first stage decoder's ``conv_in`` -- the others being run bias-free inside
their fused blocks already (:mod:`ldm_sdk.accel.block_fusion`).

Why: torch runs a cuDNN convolution with a bias as the convolution followed by ``output.add_(bias)``, a
broadcast add that torch's elementwise machinery does not vectorise over a channels_last map. In the
captured SD-1.5 guided step on an H100 (fp16, image batch 1; ``bench/profile_guided_step.py``) those were 7
kernels of 5.5 us each, 38.6 us of a 5.4 ms step; the Triton pass takes 3 us each (21 us):
``bench/results/profile_guided_step_before_h100.json`` / ``profile_guided_step_h100.json``. The step,
alternating checkouts (``bench/results/ab_step_conv_bias_h100.json``): the guided form 5.44 -> 5.42 ms, the
plain batch-2 call 5.52 -> 5.48, batch 16 31.65 -> 31.57 (its guided form 30.71 -> 30.69); the decode
unchanged.

Numerics: the same IEEE operations as the unfused path -- the convolution's output rounded to its dtype,
then ``y + bias`` in float32 rounded once -- so the results are the same bits on CUDA. Training, non-4-D
inputs, other layouts and devices run ``nn.Conv2d.forward`` unchanged (with ``backend="auto"``);
``"triton"`` forces the kernel (its errors say why it cannot run), ``"reference"`` never runs it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.residual_kernels import bias_residual_add
from ldm_sdk.accel.triton_kernels import Backend, KernelRecorder, _use_triton
from ldm_sdk.models import autoencoder, unet


class FusedBiasedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with a bias whose eval forward adds that bias in a Triton pass of its own (see the
    module doc); same Parameters as before the switch."""

    unfused_class: ClassVar[type[nn.Module]] = nn.Conv2d
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias
        if self.training or x.dim() != 4 or bias is None or self.padding_mode != "zeros":
            return nn.Conv2d.forward(self, x)
        backend = self.fusion_backend
        if backend == "reference":
            return nn.Conv2d.forward(self, x)
        if backend == "auto" and not (
            _use_triton("auto", "bias_residual_add", x, self.weight, bias)
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            return nn.Conv2d.forward(self, x)
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return bias_residual_add(y, bias, None, backend=backend, recorder=self.kernel_recorder)


def biased_conv_fusable(conv: nn.Module) -> str | None:
    """None when :class:`FusedBiasedConv2d` takes ``conv``: type exactly ``nn.Conv2d``, with a bias, zero
    padding; else a short reason."""
    if type(conv) is not nn.Conv2d:
        return f"not a plain nn.Conv2d ({type(conv).__name__})"
    if conv.bias is None:
        return "no bias"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r} (zeros only)"
    return None


def biased_conv_sites(module: nn.Module) -> list[nn.Module]:
    """The convolutions of ``module``'s networks that run through their own ``forward`` in the fused
    forms: each ``UNetModel``'s ``conv_in`` (the first input block's layer), its ``Downsample`` and
    ``Upsample`` convolutions; each first-stage ``Decoder``'s ``conv_in``."""
    sites: list[nn.Module] = []
    for net in module.modules():
        if isinstance(net, unet.UNetModel):
            sites.append(net.input_blocks[0][0])
            for m in net.modules():
                if isinstance(m, unet.Downsample) and m.use_conv:
                    sites.append(m.op)
                elif isinstance(m, unet.Upsample) and m.use_conv:
                    sites.append(m.conv)
        elif isinstance(net, autoencoder.Decoder):
            sites.append(net.conv_in)
    return sites


def fuse_biased_convs(module: nn.Module, backend: Backend) -> int:
    """Switch the :func:`biased_conv_sites` of ``module`` that :func:`biased_conv_fusable` takes to
    :class:`FusedBiasedConv2d` (in place), with ``backend``; returns how many were switched (those switched
    before are left as they are: :func:`~ldm_sdk.accel.block_fusion.fuse_blocks` counts them)."""
    switched = 0
    for conv in biased_conv_sites(module):
        if biased_conv_fusable(conv) is None:
            conv.__class__ = FusedBiasedConv2d
            conv.fusion_backend = backend
            switched += 1
    return switched


__all__ = ["FusedBiasedConv2d", "biased_conv_fusable", "biased_conv_sites", "fuse_biased_convs"]
