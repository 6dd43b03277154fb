"""Fashion-MNIST from the Debian package dataset-fashion-mnist (./test.sh installs it): counts, labels and
pixels checked against the IDX files read independently here."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_sdk.training.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FashionMNIST,
    read_idx_labels,
)


def _raw(name: str) -> bytes:
    with gzip.open(FASHION_MNIST_DIR / name, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def train() -> FashionMNIST:
    return FashionMNIST("train", 32)


def test_counts_and_classes(train: FashionMNIST) -> None:
    assert len(train) == 60_000
    assert len(FashionMNIST("test")) == 10_000
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    # the training set is balanced: 6,000 images per class
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10


def test_first_item_matches_the_idx_files(train: FashionMNIST) -> None:
    labels = _raw("train-labels-idx1-ubyte.gz")
    images = _raw("train-images-idx3-ubyte.gz")
    assert int.from_bytes(labels[:4], "big") == 2049 and int.from_bytes(images[:4], "big") == 2051
    first_label = labels[8]
    assert first_label == 9  # the first Fashion-MNIST training image is an ankle boot
    item = train[0]
    assert item["class_label"] == first_label
    assert item["caption"] == "a photo of an ankle boot"
    pixels = np.frombuffer(images[16 : 16 + 784], dtype=np.uint8).reshape(28, 28)
    image = item["image"]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    # padded: the 28x28 image centred, black (-1) around it
    assert torch.allclose(image[0, 2:30, 2:30], torch.from_numpy(pixels / 127.5 - 1.0).float(), atol=1e-6)
    assert (image[0, :2] == -1).all() and (image[0, :, 30:] == -1).all()
    last = FashionMNIST("test")[9_999]
    assert last["class_label"] == _raw("t10k-labels-idx1-ubyte.gz")[8 + 9_999]


def test_channels_and_resize() -> None:
    rgb = FashionMNIST("test", 28, channels=3)[0]["image"]
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[2])
    big = FashionMNIST("test", 64, resize="resize")[0]["image"]
    assert big.shape == (1, 64, 64) and big.min() >= -1 and big.max() <= 1
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        FashionMNIST("test", channels=2)
    with pytest.raises(ValueError, match="valid splits"):
        FashionMNIST("val")
    with pytest.raises(ValueError, match="size >= 28"):
        FashionMNIST("test", 16)


def test_bad_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST("train", root=tmp_path)
    bad = tmp_path / "labels.gz"
    with gzip.open(bad, "wb") as f:
        f.write((2051).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        read_idx_labels(bad)
    with gzip.open(bad, "wb") as f:
        f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="header says 3"):
        read_idx_labels(bad)
