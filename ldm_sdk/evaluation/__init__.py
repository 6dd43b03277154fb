"""Evaluation: generative metrics (FID / IS / KID / precision-recall through torch-fidelity), reconstruction
metrics (PSNR, SSIM, LPIPS) and task metrics (inpainting outside the mask, SR against bicubic).

None of the pretrained networks these metrics rely on (the FID InceptionV3, LPIPS' VGG16 / AlexNet trunk)
exists offline, and nothing here downloads: they take local weight paths and raise
:class:`~ldm_sdk.evaluation.generative.MissingWeightsError` without them. Stand-in writers make random
weights for tests; values computed with them are not comparable with published ones.

Names are imported lazily (torch-fidelity, lpips and kornia load on first use). CLI: ``ldm-sdk eval``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MissingWeightsError": "generative",
    "generative_metrics": "generative",
    "write_standin_inception_weights": "generative",
    "psnr": "reconstruction",
    "ssim": "reconstruction",
    "LPIPSMetric": "reconstruction",
    "reconstruction_metrics": "reconstruction",
    "write_standin_trunk": "reconstruction",
    "outside_mask_error": "tasks",
    "sr_gain": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
