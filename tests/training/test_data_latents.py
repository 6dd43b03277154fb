"""Precomputed latents: encode with a tiny random first stage, read back, refuse foreign shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from ldm_sdk.testing.tiny import KL_F8_FIRST_STAGE, LDM_VQ_F4_CLASS, SD1, random_bundle
from ldm_sdk.training.data.latents import LatentDataset, encode_to_latents


class Images(Dataset[dict[str, Any]]):
    def __init__(self, n: int = 5, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "class_label": i % 3, "caption": f"picture {i}"}


def test_mode_latents_round_trip(tmp_path: Path) -> None:
    bundle = random_bundle(SD1)  # KL-f8, scale_factor 0.18215
    data = Images()
    path = encode_to_latents(bundle, data, tmp_path / "shard.safetensors", batch_size=2)
    ds = LatentDataset(path, bundle=bundle, check_weights=True)
    assert len(ds) == 5 and ds.scale_factor == pytest.approx(0.18215)
    expected = bundle.encode_first_stage(data.images)  # posterior mode times scale_factor
    for i in range(5):
        item = ds[i]
        assert torch.allclose(item["latent"], expected[i], atol=1e-5)
        assert item["latent"].shape == (4, 4, 4)
        assert item["class_label"] == i % 3 and item["caption"] == f"picture {i}"
    # a folder of shards reads the same
    assert torch.equal(LatentDataset(tmp_path)[3]["latent"], ds[3]["latent"])


def test_moments_are_sampled_per_item(tmp_path: Path) -> None:
    bundle = random_bundle(SD1)
    data = Images(3)
    path = encode_to_latents(bundle, data, tmp_path / "m.safetensors", posterior="moments", keys=())
    ds = LatentDataset(path, bundle=bundle)
    dist = bundle.first_stage_model.encode(data.images)
    torch.manual_seed(5)
    z = ds[1]["latent"]
    torch.manual_seed(5)
    eps = torch.randn_like(dist.mean[1])
    assert torch.allclose(z, 0.18215 * (dist.mean[1] + dist.std[1] * eps), atol=1e-5)
    assert set(ds[0]) == {"latent", "index"}


def test_foreign_shards_are_refused(tmp_path: Path) -> None:
    bundle = random_bundle(SD1)
    path = encode_to_latents(bundle, Images(2), tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="different first stage"):
        LatentDataset(path, bundle=random_bundle(LDM_VQ_F4_CLASS))
    other_weights = random_bundle(SD1, seed=1)
    LatentDataset(path, bundle=other_weights)  # same config: accepted unless weights are checked
    with pytest.raises(ValueError, match="different first-stage weights"):
        LatentDataset(path, bundle=other_weights, check_weights=True)
    rescaled = random_bundle(SD1)
    rescaled.scale_factor = 1.0
    with pytest.raises(ValueError, match="scale_factor"):
        LatentDataset(path, bundle=rescaled)
    with pytest.raises(ValueError, match="needs a KL first stage"):
        encode_to_latents(
            random_bundle(LDM_VQ_F4_CLASS), Images(2), tmp_path / "v.safetensors", posterior="moments"
        )
    with pytest.raises(KeyError, match="no key 'segmentation'"):
        encode_to_latents(
            random_bundle(KL_F8_FIRST_STAGE), Images(2), tmp_path / "k.safetensors", keys=["segmentation"]
        )
    with pytest.raises(FileNotFoundError):
        LatentDataset(tmp_path / "missing.safetensors")
