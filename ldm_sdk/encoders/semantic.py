"""Semantic map -> concat conditioning: CompVis ``SpatialRescaler``.

The LDM semantic-synthesis model (``semantic_synthesis256``: ``n_stages=2, in_channels=182,
out_channels=3`` on a VQ-f4 first stage) takes a one-hot class map at image resolution, shrinks it
``n_stages`` times by ``multiplier`` with ``torch.nn.functional.interpolate(mode=method)`` to the latent
size, maps the classes to ``out_channels`` with a learned 1x1 convolution (``channel_mapper``) and
concatenates the result to the latent.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract

#: interpolation modes CompVis SpatialRescaler accepts
METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(ConditionEncoder):
    """Semantic map -> ``[B, out_channels, H / f, W / f]`` (CompVis ``SpatialRescaler``), ``f = 2**n_stages``.

    Input: an integer class map ``[B, H, W]`` (values ``0..in_channels-1``, turned into a one-hot map
    with ``in_channels`` classes) or a float one-hot / soft map ``[B, in_channels, H, W]``.
    Parameters: ``channel_mapper.weight`` ``[out_channels, in_channels, 1, 1]`` (and ``channel_mapper.bias``
    when ``bias``); no parameters when ``out_channels`` is None (the map then keeps ``in_channels``).
    """

    modality: ClassVar[str] = "semantic"
    kind: ClassVar[ConditioningKind] = "concat"
    trainable: ClassVar[bool] = True
    compvis_targets: ClassVar[tuple[str, ...]] = ("ldm.modules.encoders.modules.SpatialRescaler",)

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0; got {n_stages}")
        if method not in METHODS:
            raise ValueError(f"unknown interpolation method {method!r}; valid: {', '.join(METHODS)}")
        if multiplier <= 0:
            raise ValueError(f"multiplier must be positive; got {multiplier}")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.remap_output = out_channels is not None
        if out_channels is not None:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    @property
    def latent_factor(self) -> int | None:
        """Image size / output size: ``(1 / multiplier) ** n_stages`` when that is an integer."""
        factor = (1.0 / self.multiplier) ** self.n_stages
        return round(factor) if abs(factor - round(factor)) < 1e-9 else None

    def contract(self) -> OutputContract:
        channels = self.out_channels if self.out_channels is not None else self.in_channels
        return OutputContract(kind="concat", channels=channels, latent_factor=self.latent_factor)

    def one_hot(self, class_map: Tensor) -> Tensor:
        """Integer map ``[B, H, W]`` -> float one-hot ``[B, in_channels, H, W]`` (mapper dtype/device)."""
        if class_map.ndim != 3:
            raise ValueError(f"an integer class map must be [B, H, W]; got shape {list(class_map.shape)}")
        if class_map.numel() and (int(class_map.min()) < 0 or int(class_map.max()) >= self.in_channels):
            bad = sorted({int(v) for v in class_map.unique().tolist() if not 0 <= v < self.in_channels})
            raise ValueError(
                f"class map holds labels {bad[:10]} out of range; valid labels are 0..{self.in_channels - 1}"
            )
        onehot = F.one_hot(class_map.long(), self.in_channels).permute(0, 3, 1, 2)
        return onehot.to(device=self._device(class_map), dtype=self._dtype())

    def _device(self, x: Tensor) -> torch.device:
        return self.channel_mapper.weight.device if self.remap_output else x.device

    def _dtype(self) -> torch.dtype:
        return self.channel_mapper.weight.dtype if self.remap_output else torch.get_default_dtype()

    def forward(self, semantic_map: Tensor) -> Tensor:
        """``[B, H, W]`` integer labels or ``[B, in_channels, H, W]`` float maps -> the concat map."""
        if semantic_map.is_floating_point():
            if semantic_map.ndim != 4 or semantic_map.shape[1] != self.in_channels:
                raise ValueError(
                    f"a one-hot semantic map must be [B, {self.in_channels}, H, W]; "
                    f"got shape {list(semantic_map.shape)} (or pass integer labels [B, H, W])"
                )
            x = semantic_map.to(device=self._device(semantic_map), dtype=self._dtype())
        elif semantic_map.dtype == torch.bool or semantic_map.is_complex():
            raise TypeError(f"semantic map must be integer labels or a float map; got {semantic_map.dtype}")
        else:
            x = self.one_hot(semantic_map)
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def unconditional(self, batch_size: int) -> Tensor:
        raise ValueError(
            "a semantic map is concatenated to the latent and the LDM semantic model was never trained "
            "without it, so there is no unconditional map to drop to (no classifier-free guidance)"
        )


__all__ = ["METHODS", "SpatialRescaler"]
