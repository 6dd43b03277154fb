"""Data: rendering the synthetic scenes (in parallel processes), caching them, and the tensor data set."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .presets import Preset


# -- data ---------------------------------------------------------------------------------------------------
def asset_paths(assets: Path | None) -> dict[str, Any]:
    """SceneDataset asset arguments: the system packages, or a folder made by ``pack-assets``."""
    if assets is None:
        return {}
    return {"emoji_font": assets / "NotoColorEmoji.ttf", "clipart_root": assets / "clipart"}


def _render_chunk(job: tuple[dict[str, Any], int, int]) -> tuple[Tensor, Tensor]:
    from ldm_sdk.training.data.scenes import SceneDataset

    kwargs, start, stop = job
    dataset = SceneDataset(**kwargs)
    images = torch.empty(stop - start, 3, dataset.height, dataset.width, dtype=torch.uint8)
    labels = torch.empty(stop - start, dtype=torch.long)
    for i in range(start, stop):
        item = dataset[i]
        images[i - start] = ((item["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        labels[i - start] = item["class_label"]
    return images, labels


def render_scenes(kwargs: dict[str, Any], workers: int) -> tuple[Tensor, Tensor]:
    """All ``kwargs["length"]`` scenes as uint8 images and class labels (``workers`` processes; 0: here)."""
    n = int(kwargs["length"])
    if workers <= 0 or n < 256:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small tensor ops: one thread is fastest
        try:
            return _render_chunk((kwargs, 0, n))
        finally:
            torch.set_num_threads(threads)
    import multiprocessing as mp

    step = math.ceil(n / (workers * 4))
    jobs = [(kwargs, a, min(n, a + step)) for a in range(0, n, step)]
    with mp.get_context("spawn").Pool(workers, initializer=_render_init) as pool:
        parts = pool.map(_render_chunk, jobs)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _render_init() -> None:
    torch.set_num_threads(1)  # many processes: one thread each


def prepare_data(
    preset: Preset, out: Path, assets: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Render (or reuse) the training scenes and the FID reference scenes; returns tensors and a summary."""
    from ldm_sdk.training.data.assets import SCENE_CLASSES
    from ldm_sdk.training.data.scenes import SceneDataset

    paths = asset_paths(assets)
    sources = list(preset.sources)
    if assets is not None:
        present = {"emoji": paths["emoji_font"].is_file(), "clipart": paths["clipart_root"].is_dir()}
        sources = [s for s in sources if present.get(s, False)]
        if not sources:
            raise FileNotFoundError(f"{assets} holds none of the scene sources {list(preset.sources)}")
    common = {
        "size": preset.image_size,
        "sources": tuple(sources),
        "lowres": None,
        "mask": "box",
        "cache_dir": str(out / "cache"),
        **{k: str(v) for k, v in paths.items()},
    }
    ref_split, ref_seed = (
        ("val", preset.seed) if preset.fid_reference == "val" else ("train", preset.seed + 1)
    )
    specs = {
        "train": {**common, "split": "train", "length": preset.train_images, "seed": preset.seed},
        "ref": {**common, "split": ref_split, "length": preset.ref_images, "seed": ref_seed},
    }
    data: dict[str, Any] = {}
    summary: dict[str, Any] = {"sources": sources, "assets": str(assets) if assets else "system packages"}
    for name, spec in specs.items():
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        path = out / "data" / f"{name}-{key}.pt"
        if path.is_file():
            blob = torch.load(path)
        else:
            t0 = time.perf_counter()
            images, labels = render_scenes(spec, preset.render_workers)
            blob = {"images": images, "labels": labels}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            os.replace(tmp, path)
            log(f"rendered {len(images)} {name} scenes in {time.perf_counter() - t0:.1f}s")
        data[name] = blob
        data[f"{name}_path"] = str(path)
        hist = torch.bincount(blob["labels"], minlength=len(SCENE_CLASSES))
        summary[name] = {
            "split": spec["split"],
            "seed": spec["seed"],
            "count": len(blob["labels"]),
            "classes": {SCENE_CLASSES[i]: int(v) for i, v in enumerate(hist.tolist()) if v},
        }
    probe = SceneDataset(**{**specs["train"], "length": 1})
    summary["assets_per_source"] = {s: len(p) for s, p in probe.pools.items()}
    data["summary"] = summary
    data["paths"] = {name: data.pop(f"{name}_path") for name in specs}
    return data


class SceneTensors(Dataset[dict[str, Any]]):
    """Rendered scenes as training items: ``key`` (``image``, or ``latent`` for pixel space) in [-1, 1]
    and ``class_label``. ``fetch_times`` records when each batch is fetched (``__getitems__``, one call per
    batch of the trainer's DataLoader): the intervals are the trainer's step times; ``fetch_s`` sums the time
    spent inside (uint8 -> float batch; the DataLoader's collate and pinned copy come on top)."""

    def __init__(self, images: Tensor, labels: Tensor, key: str = "image") -> None:
        self.images, self.labels, self.key = images, labels, key
        self.fetch_times: list[float] = []
        self.fetch_s = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {self.key: self.images[index].float() / 127.5 - 1, "class_label": int(self.labels[index])}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        t = time.perf_counter()
        self.fetch_times.append(t)
        x = self.images[indices].float() / 127.5 - 1
        labels = self.labels[indices].tolist()
        items = [{self.key: x[j], "class_label": labels[j]} for j in range(len(indices))]
        self.fetch_s += time.perf_counter() - t
        return items
