"""The plugin module the ``ldm_sdk`` entry point names: hook implementations only.

Each hook imports what it registers when it is called, so discovering the plugin (``ldm-sdk plugins``, a
runtime starting) costs an import of this small module and nothing else: no torch at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ldm_sdk.hookspecs import hookimpl
from ldm_sdk_plugin_example import __version__

if TYPE_CHECKING:
    from ldm_sdk.hookspecs import Sampler
    from ldm_sdk.registry import Registry

__all__ = ["__version__", "ldm_register_condition_encoders", "ldm_register_samplers"]


@hookimpl
def ldm_register_samplers(registry: Registry[Sampler]) -> None:
    from ldm_sdk_plugin_example.heun import sample

    registry.add("heun", sample)  # description: the first line of sample's docstring


@hookimpl
def ldm_register_condition_encoders(registry: Registry[Any]) -> None:
    from ldm_sdk.encoders.base import EncoderSpec
    from ldm_sdk_plugin_example.palette import PaletteEncoder

    registry.add("palette", EncoderSpec.of(PaletteEncoder))
