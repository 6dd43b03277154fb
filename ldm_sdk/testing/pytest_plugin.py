"""The ``ldm_sdk`` pytest plugin: fixtures for plugin authors, loaded automatically once ldm-sdk is installed.

ldm-sdk registers this module under pytest's ``pytest11`` entry-point group, so any test session in an
environment with ldm-sdk gets the fixtures of :mod:`ldm_sdk.testing.fixtures` (``ldm_runtime``,
``ldm_runtime_with_entrypoints``, ``tiny_bundle``, ``tiny_sd_bundle``) without a ``conftest.py``. Disable it
with ``pytest -p no:ldm_sdk``. The contract mixins live in :mod:`ldm_sdk.testing.contracts` (import them in a
test module). Importing this module imports pytest only: torch and the SDK load when a fixture runs.
"""

from __future__ import annotations

from ldm_sdk.testing.fixtures import ldm_runtime, ldm_runtime_with_entrypoints, tiny_bundle, tiny_sd_bundle

__all__ = ["ldm_runtime", "ldm_runtime_with_entrypoints", "tiny_bundle", "tiny_sd_bundle"]
