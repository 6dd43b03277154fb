"""ldm-sdk: Latent Diffusion Models as an image-editing SDK.

``ldm_sdk.load(path)`` reads a CompVis / Stable Diffusion checkpoint into a :class:`ModelBundle`.
Importing the package loads no model, plugin or device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ModelBundle", "__version__", "load"]

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import load


def __getattr__(name: str) -> Any:
    # Resolved on first use so that `import ldm_sdk` stays cheap for host glue and CLI start-up.
    if name == "load":
        from ldm_sdk.checkpoints.loader import load

        return load
    if name == "ModelBundle":
        from ldm_sdk.checkpoints.bundle import ModelBundle

        return ModelBundle
    raise AttributeError(f"module 'ldm_sdk' has no attribute {name!r}")
