"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

The four gzipped IDX files: images have magic 2051 (``0x00000803``: unsigned bytes, 3 dimensions) and the
counts ``n, 28, 28`` as big-endian int32, pixels from byte 16; labels have magic 2049 (``0x00000801``) and
``n``, labels from byte 8. ``"train"`` holds 60,000 images, ``"test"`` 10,000; 10 classes
(:data:`FASHION_MNIST_CLASSES`). The arrays are read on first use, once per dataset object.

Items use the same keys as the other datasets: ``image`` float ``[C, size, size]`` in [-1, 1] (``C`` =
``channels``, 1 or 3; white garment on black, as stored), ``class_label``, ``caption`` (``"a photo of a
sneaker"``), ``index``. ``resize="pad"`` centres the 28x28 image on a black ``size`` x ``size`` canvas
(``size >= 28``, e.g. 32 for a factor-8 or factor-4 first stage); ``"resize"`` resamples it (bilinear,
antialiased).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: caption nouns of the classes
FASHION_MNIST_NOUNS: tuple[str, ...] = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
APT_PACKAGE = "dataset-fashion-mnist"


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} is missing; install the Debian package {APT_PACKAGE} "
            f"(apt-get install {APT_PACKAGE}) or pass root= pointing at the four *-ubyte.gz files"
        )
    with gzip.open(path, "rb") as f:
        return f.read()


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """``uint8 [n, rows, cols]`` from a gzipped IDX3 file; checks the magic number and the length."""
    data = _read_gz(Path(path))
    magic, n, rows, cols = (int.from_bytes(data[i : i + 4], "big") for i in range(0, 16, 4))
    if magic != IMAGES_MAGIC:
        raise ValueError(f"{path}: magic number {magic}, expected {IMAGES_MAGIC} (IDX3 unsigned-byte images)")
    if len(data) != 16 + n * rows * cols:
        raise ValueError(f"{path}: {len(data) - 16} pixel bytes, header says {n}x{rows}x{cols}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """``uint8 [n]`` from a gzipped IDX1 file; checks the magic number and the length."""
    data = _read_gz(Path(path))
    magic, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    if magic != LABELS_MAGIC:
        raise ValueError(f"{path}: magic number {magic}, expected {LABELS_MAGIC} (IDX1 unsigned-byte labels)")
    if len(data) != 8 + n:
        raise ValueError(f"{path}: {len(data) - 8} label bytes, header says {n}")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def caption(label: int) -> str:
    """``"a photo of a sneaker"`` / ``"a photo of an ankle boot"``."""
    noun = FASHION_MNIST_NOUNS[label]
    return f"a photo of {'an' if noun[0] in 'aeiou' else 'a'} {noun}"


class FashionMNIST(Dataset[dict[str, Any]]):
    """One split of Fashion-MNIST (module docstring)."""

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        *,
        channels: int = 1,
        resize: str = "pad",
        root: str | os.PathLike[str] = FASHION_MNIST_DIR,
    ) -> None:
        if split not in FILES:
            raise ValueError(f"unknown split {split!r}; valid splits are {list(FILES)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels}")
        if resize not in ("pad", "resize"):
            raise ValueError(f"resize must be 'pad' or 'resize'; got {resize!r}")
        if size < 1 or (resize == "pad" and size < 28):
            raise ValueError(f"size {size} is too small: 'pad' needs size >= 28, 'resize' size >= 1")
        self.split, self.size, self.channels, self.resize = split, size, channels, resize
        self.root = Path(root)
        for name in FILES[split]:
            if not (self.root / name).is_file():
                _read_gz(self.root / name)  # raises the install hint
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-read the files (0.3 s) instead of receiving 47 MB through a pipe
        return {**self.__dict__, "_images": None, "_labels": None}

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None or self._labels is None:
            images_file, labels_file = FILES[self.split]
            images = read_idx_images(self.root / images_file)
            labels = read_idx_labels(self.root / labels_file)
            if len(images) != len(labels):
                raise ValueError(f"{self.root}: {len(images)} images, {len(labels)} labels in {self.split}")
            self._images, self._labels = images, labels
        return self._images, self._labels

    @property
    def labels(self) -> np.ndarray:
        """All labels of the split, ``uint8 [n]``."""
        return self._load()[1]

    def __len__(self) -> int:
        return len(self._load()[1])

    def image_tensor(self, raw: np.ndarray) -> Tensor:
        """``uint8 [28, 28]`` -> float ``[C, size, size]`` in [-1, 1] (module docstring)."""
        x = torch.from_numpy(raw.astype(np.float32) / 255.0)[None]
        h, w = x.shape[-2:]
        if self.resize == "pad":
            top, left = (self.size - h) // 2, (self.size - w) // 2
            x = F.pad(x, (left, self.size - w - left, top, self.size - h - top))
        elif (h, w) != (self.size, self.size):
            x = F.interpolate(x[None], (self.size, self.size), mode="bilinear", antialias=True)[0]
        return (x.clamp(0, 1) * 2 - 1).expand(self.channels, -1, -1).clone()

    def __getitem__(self, index: int) -> dict[str, Any]:
        images, labels = self._load()
        if not -len(labels) <= index < len(labels):
            raise IndexError(f"index {index} out of range for {len(labels)} {self.split} images")
        label = int(labels[index])
        return {
            "image": self.image_tensor(images[index]),
            "class_label": label,
            "caption": caption(label),
            "index": index % len(labels),
        }
