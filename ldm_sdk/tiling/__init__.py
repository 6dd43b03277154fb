"""Tiling: first-stage decode/encode and denoising over overlapping windows, blended without seams.

- :mod:`ldm_sdk.tiling.grid`: windows over a map and blending weights that partition unity.
- :mod:`ldm_sdk.tiling.vae`: :func:`tiled_decode`, :func:`tiled_encode`.
- :mod:`ldm_sdk.tiling.denoiser`: :class:`TiledDenoiser` (convolutional sampling of large latents).
- :mod:`ldm_sdk.tiling.plan`: :func:`plan_tiles`, the window size a memory budget allows.
"""

from __future__ import annotations

from ldm_sdk.tiling.denoiser import TiledDenoiser, WindowFactory, crop_conditioning
from ldm_sdk.tiling.grid import RAMPS, Ramp, TileGrid, Window, axis_starts, axis_weights, blend
from ldm_sdk.tiling.plan import ActivationModel, TilePlan, available_accelerator_bytes, plan_tiles
from ldm_sdk.tiling.vae import tiled_decode, tiled_encode

__all__ = [
    "RAMPS",
    "ActivationModel",
    "Ramp",
    "TileGrid",
    "TilePlan",
    "TiledDenoiser",
    "Window",
    "WindowFactory",
    "available_accelerator_bytes",
    "axis_starts",
    "axis_weights",
    "blend",
    "crop_conditioning",
    "plan_tiles",
    "tiled_decode",
    "tiled_encode",
]
