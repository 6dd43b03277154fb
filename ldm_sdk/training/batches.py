"""From a dataset spec to batches: the data sets by name, batch collation, a resumable distributed order.

Dataset specs (``--data``, options of the data set as JSON in ``--data-options``): ``folder:PATH`` (images in
a folder tree), ``fashion_mnist[:SPLIT]`` (3 channels), ``scenes[:SPLIT]`` (composited emoji/clip-art
scenes with every modality), ``latents:SHARD[,SHARD...]`` (precomputed first-stage latents), all from
:mod:`ldm_sdk.training.data`; and ``synthetic:N`` (N procedural images with every key, for tests and smoke
runs). Items are dicts with the CompVis keys: ``image`` ``[3, H, W]`` in [-1, 1], ``caption``,
``class_label``, ``boxes``, ``segmentation``, ``mask``, ``lowres`` (and ``latent`` for precomputed latents).

:class:`ResumableSampler` is ``DistributedSampler``'s order (a permutation seeded with ``seed + epoch``,
dropped to a multiple of the world size, rank ``r`` taking positions ``r, r + W, ...``) that can start in
the middle of an epoch; :class:`BatchStream` walks it epoch after epoch and reports its position, which the
training checkpoint stores. Every draw that depends on the data order is therefore reproducible on resume.
Random transforms inside a dataset are reproducible when they draw from a per-item seed (as ours do), or
with ``num_workers=0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def _scenes(arg: str, image_size: int, seed: int, **kw: Any) -> Dataset[Any]:
    from ldm_sdk.training.data.scenes import SceneDataset

    return SceneDataset(arg or "train", image_size, seed=seed, **kw)


def _fashion_mnist(arg: str, image_size: int, seed: int, **kw: Any) -> Dataset[Any]:
    from ldm_sdk.training.data.fashion_mnist import FashionMNIST

    return FashionMNIST(arg or "train", image_size, **{"channels": 3, **kw})


def _folder(arg: str, image_size: int, seed: int, **kw: Any) -> Dataset[Any]:
    if not arg:
        raise ValueError("--data folder:PATH needs the folder, e.g. folder:/data/images")
    from ldm_sdk.training.data import folder

    return folder.ImageFolderDataset(arg, image_size, **kw)


def _latents(arg: str, image_size: int, seed: int, **kw: Any) -> Dataset[Any]:
    if not arg:
        raise ValueError("--data latents:PATH needs the folder or file of precomputed latents")
    from ldm_sdk.training.data import latents

    return latents.LatentDataset(arg.split(","), **kw)


#: spec name -> builder(arg, image_size, seed, **options) -> Dataset (the data sets of ldm_sdk.training.data)
DATASETS: dict[str, Callable[..., Dataset[Any]]] = {
    "folder": _folder,
    "fashion_mnist": _fashion_mnist,
    "scenes": _scenes,
    "latents": _latents,
}


class SyntheticImages(Dataset[dict[str, Any]]):
    """``n`` procedural images (smooth colour blobs on a grid) with every CompVis key; item ``i`` depends
    only on ``(seed, i)``. For tests and smoke runs: no files needed."""

    def __init__(self, n: int, image_size: int = 32, *, seed: int = 0, n_classes: int = 10) -> None:
        if n < 1 or image_size < 4:
            raise ValueError(f"synthetic data needs n >= 1 and image_size >= 4; got {n}, {image_size}")
        self.n, self.size, self.seed, self.n_classes = n, image_size, seed, n_classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.n_classes
        coarse = torch.rand(3, 4, 4, generator=g) * 2 - 1
        image = torch.nn.functional.interpolate(
            coarse[None], size=(self.size, self.size), mode="bilinear", align_corners=False
        )[0].clamp(-1, 1)
        segmentation = (image[0] > 0).long() + (image[1] > 0).long()
        mask = torch.zeros(1, self.size, self.size)
        q = self.size // 4
        mask[:, q : 3 * q, q : 3 * q] = 1.0
        lowres = torch.nn.functional.avg_pool2d(image[None], 4)[0]
        return {
            "image": image,
            "caption": f"pattern number {label}",
            "class_label": label,
            "segmentation": segmentation,
            "mask": mask,
            "lowres": lowres,
        }


def build_dataset(spec: str, *, image_size: int, seed: int = 0, **kwargs: Any) -> Dataset[Any]:
    """The dataset a ``--data`` spec names (see the module docstring)."""
    name, _, arg = spec.partition(":")
    if name == "synthetic":
        try:
            n = int(arg or 64)
        except ValueError:
            raise ValueError(f"--data {spec!r}: synthetic takes a count, e.g. synthetic:64") from None
        return SyntheticImages(n, image_size, seed=seed)
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r} in --data {spec!r}; valid: synthetic:N, {', '.join(DATASETS)}"
        )
    try:
        return DATASETS[name](arg, image_size, seed, **kwargs)
    except ImportError as exc:
        raise ValueError(f"--data {spec!r}: the {name!r} data set is not available ({exc})") from exc


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dict items: same-shape tensors are stacked, numbers become a tensor, everything else (captions,
    variable-length boxes) stays a list."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = set(items[0])
    for item in items[1:]:
        if set(item) != keys:
            raise ValueError(f"dataset items have different keys: {sorted(keys)} vs {sorted(item)}")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, Tensor) and all(
            isinstance(v, Tensor) and v.shape == first.shape for v in values
        ):
            batch[key] = torch.stack(values)
        elif isinstance(first, bool | int) and all(isinstance(v, int) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float) and all(isinstance(v, int | float) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = values
    return batch


class ResumableSampler(Sampler[int]):
    """This rank's indices of one epoch, in ``DistributedSampler`` order, from position ``start`` on."""

    def __init__(
        self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True
    ) -> None:
        if size < world_size:
            raise ValueError(f"a dataset of {size} items cannot feed {world_size} processes")
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch = 0
        self.start = 0

    @property
    def per_rank(self) -> int:
        return self.size // self.world_size  # drop_last, as DistributedSampler(drop_last=True)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return order[: self.per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


class BatchStream:
    """Endless batches over epochs, with a position (``epoch``, ``batches_done``) to save and restore."""

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        self.sampler = ResumableSampler(size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        self.batches_per_epoch = self.sampler.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset has {size} items: too few for one batch of {batch_size} on each of "
                f"{world_size} processes (need >= {batch_size * world_size}); lower --batch-size"
            )
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.world_size, self.num_workers, self.pin_memory = world_size, num_workers, pin_memory
        self.epoch = 0
        self.batches_done = 0
        self._iterator: Iterator[dict[str, Any]] | None = None

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch, self.batches_done * self.batch_size)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            # worker seeds from (seed, epoch, rank), not from the global RNG
            generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 1009 + self.rank),
            persistent_workers=False,
        )
        self._iterator = iter(loader)

    def __next__(self) -> dict[str, Any]:
        if self.batches_done >= self.batches_per_epoch:
            self.epoch += 1
            self.batches_done = 0
            self._iterator = None
        if self._iterator is None:
            self._start()
        assert self._iterator is not None
        batch = next(self._iterator)
        self.batches_done += 1
        return batch

    def __iter__(self) -> BatchStream:
        return self

    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state(self, state: Mapping[str, int]) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            # another world size: same epoch, the position scaled to this one's batches
            done = state["batches_done"] * state["world_size"] / self.world_size
            self.batches_done = min(self.batches_per_epoch, math.floor(done))
        else:
            self.batches_done = int(state["batches_done"])
        self.epoch = int(state["epoch"])
        self._iterator = None


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of ``batch`` moved to ``device`` (non-blocking); other values unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


__all__ = [
    "DATASETS",
    "BatchStream",
    "ResumableSampler",
    "SyntheticImages",
    "build_dataset",
    "collate",
    "to_device",
]
