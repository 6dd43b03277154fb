"""An example ldm-sdk plugin: the ``heun`` sampler and the ``palette`` condition encoder.

The hooks live in :mod:`ldm_sdk_plugin_example.plugin` (the entry point); the sampler in
:mod:`ldm_sdk_plugin_example.heun`, the encoder in :mod:`ldm_sdk_plugin_example.palette`. Importing this
package imports nothing else.
"""

__version__ = "0.1.0"
