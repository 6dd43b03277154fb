"""Tiny model configurations for the SDK's tests: re-exported from :mod:`ldm_sdk.testing.tiny` (one source,
shared with plugin authors through the ``ldm_sdk`` pytest plugin's fixtures)."""

from __future__ import annotations

from ldm_sdk.testing.tiny import (
    ALL,
    CLASS_TARGET,
    CLIP_TARGET,
    KL_F8_FIRST_STAGE,
    LDM_KL_F4_UNCOND,
    LDM_VQ_F4_CLASS,
    OPENCLIP_TARGET,
    SD1,
    SD2_V,
    SD_INPAINT,
    TINY_KL_F4,
    TINY_KL_F8,
    TINY_VQ_F4,
    fake_cond_stage_weights,
    random_bundle,
)

__all__ = [
    "ALL",
    "CLASS_TARGET",
    "CLIP_TARGET",
    "KL_F8_FIRST_STAGE",
    "LDM_KL_F4_UNCOND",
    "LDM_VQ_F4_CLASS",
    "OPENCLIP_TARGET",
    "SD1",
    "SD2_V",
    "SD_INPAINT",
    "TINY_KL_F4",
    "TINY_KL_F8",
    "TINY_VQ_F4",
    "fake_cond_stage_weights",
    "random_bundle",
]
