"""Argument checks shared by the convolution fast paths (:mod:`ldm_sdk.accel.thin_conv`,
:mod:`ldm_sdk.accel.small_conv`): a 4-D floating map, a 3x3 weight over its channels, an optional bias, all on
one device; whether a map's memory holds contiguous ``(N, H, W, C)`` pixel rows; whether a module is a plain
stride-1 "same" convolution."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from ldm_sdk.accel.triton_kernels import KERNEL_DTYPES


def nhwc(x: Tensor) -> bool:
    """Whether ``x``'s memory holds contiguous ``(N, H, W, C)`` pixel rows (a channels_last 4-D tensor): what
    a GEMM over the pixels reads without a copy."""
    return x.is_contiguous(memory_format=torch.channels_last)


def check_map(x: Tensor, what: str) -> None:
    """``x`` is a floating-point ``(N, C, H, W)`` tensor, else a ValueError naming ``what`` took it."""
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} takes a floating-point (N, C, H, W) tensor, got {got}")


def check_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, what: str) -> None:
    """``x`` a floating ``(N, C_in, H, W)`` tensor, ``weight`` ``(C_out, C_in, 3, 3)``, ``bias`` None or
    ``(C_out,)``, all on ``x``'s device; else a ValueError saying what was given and what is valid."""
    check_map(x, what)
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a (C_out, C_in, 3, 3) tensor with C_in = {x.shape[1]} (x's channels), got {got}"
        )
    c_out = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (c_out,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must be None or a 1-D tensor of {c_out} values (C_out), got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: it must be on x's device")


def kernel_input_problem(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """None when a GEMM-based convolution path can read these inputs as they are (a channels_last ``x`` of a
    kernel dtype, a weight -- and a bias, when given -- of ``x``'s dtype), else what it takes instead."""
    if not nhwc(x):
        return "a channels_last x (x.contiguous(memory_format=torch.channels_last)), got another layout"
    if x.dtype not in KERNEL_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return f"x of dtype {valid}, got {x.dtype}"
    if weight.dtype != x.dtype:
        return f"a weight of x's dtype ({x.dtype}), got {weight.dtype}"
    if bias is not None and bias.dtype != x.dtype:
        return f"a bias of x's dtype ({x.dtype}), got {bias.dtype}"
    return None


def plain_conv(module: nn.Module | None, kernel: int) -> bool:
    """Whether ``module`` is exactly an ``nn.Conv2d`` with a ``kernel x kernel`` window, stride 1, "same"
    zero padding (``kernel // 2``), no dilation and one group: the convolutions the fast paths rewrite."""
    if type(module) is not nn.Conv2d:
        return False
    c = cast(nn.Conv2d, module)
    return (
        c.kernel_size == (kernel, kernel)
        and c.stride == (1, 1)
        and c.padding == (kernel // 2, kernel // 2)
        and c.dilation == (1, 1)
        and c.groups == 1
        and c.padding_mode == "zeros"
    )


__all__ = ["check_conv3x3", "check_map", "kernel_input_problem", "nhwc", "plain_conv"]
