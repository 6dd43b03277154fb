"""Where the SDK keeps what it builds or computes once per machine: the CLIP tokenizer folder, the asset
index of the training data, the checkpoints' sha256 digests.

``$LDM_SDK_CACHE``, else ``$XDG_CACHE_HOME/ldm-sdk``, else ``~/.cache/ldm-sdk``. Everything in it can be
deleted at any time; it is rebuilt on next use.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LDM_SDK_CACHE"


def cache_root() -> Path:
    """``$LDM_SDK_CACHE``, else ``$XDG_CACHE_HOME/ldm-sdk``, else ``~/.cache/ldm-sdk`` (not created here)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ldm-sdk"


__all__ = ["CACHE_ENV", "cache_root"]
