"""Datasets for training both stages; items are dicts with CompVis batch keys (``image`` in [-1, 1],
``caption``, ``class_label``, ...).

- :mod:`~ldm_sdk.training.data.folder`: :class:`ImageFolderDataset`, your own images with sidecar captions;
- :mod:`~ldm_sdk.training.data.scenes`: :class:`SceneDataset`, synthetic emoji / clip-art scenes with exact
  captions, classes, boxes, segmentation, masks and low-res versions (assets: :mod:`.assets`);
- :mod:`~ldm_sdk.training.data.fashion_mnist`: :class:`FashionMNIST` from the Debian package;
- :mod:`~ldm_sdk.training.data.latents`: :func:`encode_to_latents` / :class:`LatentDataset`, precomputed
  first-stage latents.

Names are imported lazily: importing this package reads no file and imports neither PIL nor fontTools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImageFolderDataset": "folder",
    "SceneDataset": "scenes",
    "Scene": "scenes",
    "layout_objects": "scenes",
    "SCENE_CLASSES": "assets",
    "load_asset_index": "assets",
    "FashionMNIST": "fashion_mnist",
    "FASHION_MNIST_CLASSES": "fashion_mnist",
    "encode_to_latents": "latents",
    "LatentDataset": "latents",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
