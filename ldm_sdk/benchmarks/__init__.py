"""Benchmarks that ship with the package (``ldm-sdk bench``; ``bench/`` holds the scripts).

- :mod:`ldm_sdk.benchmarks.sampling`: ldm_sdk against diffusers on identical random weights (GPU and CPU
  modes); :mod:`~ldm_sdk.benchmarks.options` its options, :mod:`~ldm_sdk.benchmarks.common` the shared
  architectures, weight conversion and timing helpers.
"""
