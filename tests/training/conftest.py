"""Fixtures of the training tests: tiny first-stage checkpoints and a tiny in-test image data set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import ModelConfig
from ldm_sdk.testing.tiny import TINY_KL_F4, TINY_VQ_F4


class TinyImages(Dataset[dict[str, Any]]):
    """``n`` smooth random images (bilinear upsampling of 4x4 noise) of ``size`` pixels, with a class label,
    a caption and a low-res copy; item ``i`` depends only on ``(seed, i)``."""

    def __init__(self, n: int = 4, size: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
        self.images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i]
        return {
            "image": image,
            "class_label": i % 10,
            "caption": f"image {i}",
            "lowres": F.avg_pool2d(image[None], 4)[0],
        }


def _first_stage_file(config: Any, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    bundle = ModelBundle(ModelConfig(family="tiny-first-stage", first_stage=config))
    return save(bundle, path)


@pytest.fixture(scope="session")
def kl_first_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny KL-f4 first stage (default init, 3 latent channels) saved as .safetensors."""
    return _first_stage_file(TINY_KL_F4, tmp_path_factory.mktemp("fs") / "kl_f4.safetensors", 1)


@pytest.fixture(scope="session")
def vq_first_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VQ-f4 first stage saved as .safetensors."""
    return _first_stage_file(TINY_VQ_F4, tmp_path_factory.mktemp("fs") / "vq_f4.safetensors", 2)


@pytest.fixture
def tiny_images() -> TinyImages:
    return TinyImages()


def autoencoder_args(*extra: str, model: str = "tiny:kl-f4") -> list[str]:
    """Command-line flags of a tiny, fast autoencoder run on CPU (the tests add what they vary)."""
    return [
        "--model",
        model,
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--no-scale-lr",
        "--disc-ndf",
        "8",
        "--disc-layers",
        "2",
        "--log-every",
        "100",
        "--sample-every",
        "0",
        "--device",
        "cpu",
        *extra,
    ]
