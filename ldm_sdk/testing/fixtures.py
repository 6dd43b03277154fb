"""Pytest fixtures for testing ldm-sdk plugins; :mod:`ldm_sdk.testing.pytest_plugin` makes them available.

- ``ldm_runtime``: a CPU :class:`~ldm_sdk.runtime.Runtime` with the built-in plugin only (no entry points),
  closed after the test. Register the plugin under test with ``ldm_runtime.register_plugin(module)``.
- ``ldm_runtime_with_entrypoints``: the same, discovering installed ``ldm_sdk`` entry points as users get
  (``$LDM_SDK_DISABLE_PLUGINS`` still applies).
- ``tiny_bundle``: a random-weight class-conditional LDM (VQ-f4, ``ClassEmbedder`` by cross-attention,
  ``cond_stage_weights`` shaped like the real encoder's), built in well under a second on the CPU.
- ``tiny_sd_bundle``: a random-weight Stable-Diffusion-1.x-shaped model (KL-f8, cross-attention context 32,
  eps); its ``cond_stage_weights`` are two stand-in CLIP tensors, not a whole text encoder.

Nothing here imports torch or the SDK until a fixture runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.runtime import Runtime

__all__ = ["ldm_runtime", "ldm_runtime_with_entrypoints", "tiny_bundle", "tiny_sd_bundle"]


def _cpu_runtime(*, load_entrypoints: bool) -> Iterator[Runtime]:
    from ldm_sdk.runtime import Runtime

    with Runtime.create(load_entrypoints=load_entrypoints, device="cpu") as runtime:
        yield runtime


@pytest.fixture
def ldm_runtime() -> Iterator[Runtime]:
    """A CPU runtime with the built-in plugin only (``load_entrypoints=False``), closed after the test."""
    yield from _cpu_runtime(load_entrypoints=False)


@pytest.fixture
def ldm_runtime_with_entrypoints() -> Iterator[Runtime]:
    """A CPU runtime that discovers installed entry-point plugins, closed after the test."""
    yield from _cpu_runtime(load_entrypoints=True)


@pytest.fixture
def tiny_bundle() -> ModelBundle:
    """A tiny random-weight class-conditional LDM (``ldm_sdk.testing.tiny.LDM_VQ_F4_CLASS``), seed 0."""
    from ldm_sdk.testing.tiny import LDM_VQ_F4_CLASS, random_bundle

    return random_bundle(LDM_VQ_F4_CLASS, seed=0).eval()


@pytest.fixture
def tiny_sd_bundle() -> ModelBundle:
    """A tiny random-weight SD-1.x-shaped model (``ldm_sdk.testing.tiny.SD1``), seed 0."""
    from ldm_sdk.testing.tiny import SD1, random_bundle

    return random_bundle(SD1, seed=0).eval()
