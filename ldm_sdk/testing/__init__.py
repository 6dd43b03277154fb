"""Testing kit for ldm-sdk plugin authors (and the SDK's own tests).

- :mod:`ldm_sdk.testing.contracts`: contract test mixins (``ConditionEncoderContract``).
- :mod:`ldm_sdk.testing.fixtures`: pytest fixtures (``ldm_runtime``, ``tiny_bundle`` ...), made available in
  every pytest session by the ``ldm_sdk`` pytest plugin (:mod:`ldm_sdk.testing.pytest_plugin`).
- :mod:`ldm_sdk.testing.tiny`: tiny model configurations and random-weight bundles.

Importing this package imports nothing else; import the submodule you need.
"""
