"""Tiny model configurations for the SDK's tests: re-exported from :mod:`ldm_sdk.testing.tiny` (one source,
shared with plugin authors through the ``ldm_sdk`` pytest plugin's fixtures)."""

from __future__ import annotations

from ldm_sdk.testing import tiny
from ldm_sdk.testing.tiny import *  # noqa: F403

__all__ = list(tiny.__all__)
