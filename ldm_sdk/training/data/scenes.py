"""The built-in synthetic scenes: emoji and clip-art composited on canvases, with exact ground truth.

Item ``index`` of a split is a pure function of ``(seed, split, index)`` and the dataset's options (a
``numpy`` ``default_rng([seed, split, index])`` draws everything), so it is the same in every process, worker
and run. A scene is drawn like this:

1. a background: ``plain`` (one named colour), ``gradient`` (two named colours along a random direction)
   or ``noise`` (a named colour plus Gaussian noise, std 0.08), from :data:`NAMED_COLORS`;
2. ``objects`` (inclusive range, default 1..3) objects, back to front; each picks a source uniformly among
   ``sources`` (so emoji and clip-art are equally frequent whatever their counts), then an asset of this
   split uniformly, scales it so its longest side is ``uniform(*scale)`` times the canvas' shorter side
   (antialiased bilinear on premultiplied RGBA) and places it fully inside the canvas at a uniform random
   position. An asset whose alpha never reaches 0.5 at that size is redrawn;
3. compositing with premultiplied alpha: ``canvas = canvas * (1 - alpha) + alpha * rgb``.

Ground truth of an item (:meth:`SceneDataset.__getitem__`), all from the same alphas:

- ``image``: float ``[3, H, W]`` in [-1, 1];
- ``caption``: the objects' captions with articles, joined, then the background: ``"a grinning face and
  a red apple on a blue background"``; ``class_label``: the class of the object with the most visible
  pixels (ties: the backmost); ids from :data:`~ldm_sdk.training.data.assets.SCENE_CLASSES`;
- ``boxes``: float ``[max_objects, 4]`` ``(x0, y0, x1, y1)`` in [0, 1], the tight box of the pixels where
  that object's alpha is >= 0.5, back to front; ``box_classes``: long ``[max_objects]``, ``-1`` in unused
  rows; ``num_objects``;
- ``segmentation``: long ``[H, W]``, the class of the topmost object whose alpha is >= 0.5, 0 elsewhere;
- ``mask``: float ``[1, H, W]``, 1 = the region to fill. ``mask="object"``: the full alpha of one object
  (``mask_object`` says which); ``"box"`` / ``"brush"``: :mod:`~ldm_sdk.training.data.masks`; ``"random"``:
  one of the three per item. The mask draws from its own random stream, so it never changes the scene;
- ``lowres`` (unless ``lowres=None``): ``[3, H/f, W/f]`` in [-1, 1]: ``"bicubic"``
  (:func:`~ldm_sdk.encoders.degradations.bicubic_downsample`) or ``"bsr"``
  (:func:`~ldm_sdk.encoders.degradations.degrade_bsr`, its generator seeded per item).

:meth:`SceneDataset.render` returns the :class:`Scene` behind an item: every object's asset and canvas
alpha, and the instance map.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ldm_sdk.training.data.assets import SOURCES, SPLITS, Asset, load_asset_index, split_assets
from ldm_sdk.training.data.clipart import CLIPART_ROOT, read_clipart_rgba
from ldm_sdk.training.data.emoji import EMOJI_FONT, EmojiBitmaps
from ldm_sdk.training.data.masks import random_box_mask, random_brush_mask

NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 210, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "purple": (148, 103, 189),
    "pink": (240, 130, 190),
    "brown": (140, 86, 75),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (127, 127, 127),
    "teal": (23, 190, 190),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise")
MASK_MODES: tuple[str, ...] = ("object", "box", "brush", "random")
LOWRES_MODES: tuple[str | None, ...] = ("bicubic", "bsr", None)
ALPHA_THRESHOLD = 0.5
_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class SceneObject:
    """One placed object: its asset, its coverage ``alpha`` ``[H, W]`` on the canvas, its box."""

    asset: Asset
    alpha: Tensor
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A rendered scene (module docstring): ``image`` and ``backdrop`` (the background alone) in [0, 1];
    ``instances`` ``[H, W]``: 0 background, ``i + 1`` where object ``i`` is on top."""

    image: Tensor
    backdrop: Tensor
    objects: tuple[SceneObject, ...]
    background: str
    caption: str
    class_label: int
    segmentation: Tensor
    instances: Tensor


def article(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def compose_caption(object_captions: Sequence[str], background: str) -> str:
    """``"a x, a y and an z on a <background>"``."""
    named = [article(c) for c in object_captions]
    things = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"{things} on {article(background)}"


def _color(name: str) -> Tensor:
    return torch.tensor(NAMED_COLORS[name], dtype=torch.float32).view(3, 1, 1) / 255.0


def draw_background(rng: np.random.Generator, kind: str, height: int, width: int) -> tuple[Tensor, str]:
    """A ``[3, H, W]`` background in [0, 1] and its caption."""
    names = list(NAMED_COLORS)
    first = names[int(rng.integers(len(names)))]
    if kind == "plain":
        return _color(first).expand(3, height, width).clone(), f"{first} background"
    if kind == "gradient":
        second = [n for n in names if n != first][int(rng.integers(len(names) - 1))]
        angle = rng.uniform(0.0, 2 * np.pi)
        yy, xx = torch.meshgrid(
            torch.linspace(-0.5, 0.5, height), torch.linspace(-0.5, 0.5, width), indexing="ij"
        )
        c, s = float(np.cos(angle)), float(np.sin(angle))
        t = ((xx * c + yy * s) / (abs(c) + abs(s)) + 0.5).clamp(0, 1)[None]
        return _color(first) * (1 - t) + _color(second) * t, f"{first} and {second} gradient background"
    if kind == "noise":
        noise = torch.from_numpy(rng.standard_normal((3, height, width)).astype(np.float32)) * 0.08
        return (_color(first) + noise).clamp(0, 1), f"noisy {first} background"
    raise ValueError(f"unknown background {kind!r}; valid backgrounds are {list(BACKGROUNDS)}")


def tight_box(alpha: Tensor, threshold: float = ALPHA_THRESHOLD) -> tuple[float, float, float, float] | None:
    """Relative ``(x0, y0, x1, y1)`` of the pixels where ``alpha >= threshold``; ``None`` when none is."""
    on = alpha >= threshold
    rows, cols = on.any(dim=1).nonzero().flatten(), on.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    h, w = alpha.shape
    return (int(cols[0]) / w, int(rows[0]) / h, (int(cols[-1]) + 1) / w, (int(rows[-1]) + 1) / h)


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}; got {value}")


class SceneDataset(Dataset[dict[str, Any]]):
    """Synthetic scenes of one split (module docstring). ``size``: int or ``(height, width)``."""

    def __init__(
        self,
        split: str = "train",
        size: int | tuple[int, int] = 256,
        *,
        length: int = 10_000,
        seed: int = 0,
        sources: Sequence[str] = SOURCES,
        objects: tuple[int, int] = (1, 3),
        scale: tuple[float, float] = (0.25, 0.6),
        backgrounds: Sequence[str] = BACKGROUNDS,
        mask: str = "object",
        lowres: str | None = "bicubic",
        lowres_factor: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        emoji_font: str | os.PathLike[str] = EMOJI_FONT,
        clipart_root: str | os.PathLike[str] = CLIPART_ROOT,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.height, self.width) < 8:
            raise ValueError(f"size must be at least 8 pixels; got {size}")
        if length < 1 or seed < 0:
            raise ValueError(f"need length >= 1 and seed >= 0; got length={length}, seed={seed}")
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(
                f"objects must be an inclusive range (low, high) with 1 <= low <= high; got {objects}"
            )
        _check_range("scale", scale, 0.0, 1.0)
        bad = [b for b in backgrounds if b not in BACKGROUNDS]
        if bad or not backgrounds:
            raise ValueError(f"unknown backgrounds {bad or []}; valid backgrounds are {list(BACKGROUNDS)}")
        if mask not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mask!r}; valid modes are {list(MASK_MODES)}")
        if lowres not in LOWRES_MODES:
            raise ValueError(f"unknown lowres mode {lowres!r}; valid modes are {list(LOWRES_MODES)}")
        if lowres is not None and (self.height % lowres_factor or self.width % lowres_factor):
            raise ValueError(
                f"size {self.height}x{self.width} is not a multiple of lowres_factor {lowres_factor}"
            )
        self.split, self.length, self.seed = split, length, seed
        self.objects, self.scale, self.backgrounds = objects, scale, tuple(backgrounds)
        self.mask_mode, self.lowres, self.lowres_factor = mask, lowres, lowres_factor
        self.clipart_root = Path(clipart_root)
        self._emoji = EmojiBitmaps(emoji_font)
        index = load_asset_index(sources, emoji_font=emoji_font, clipart_root=clipart_root, cache=cache_dir)
        assets = split_assets(index, split, val_fraction=val_fraction, split_seed=split_seed)
        self.pools: dict[str, list[Asset]] = {}
        for source in sources:
            pool = [a for a in assets if a.source == source]
            if pool:
                self.pools[source] = pool
        if not self.pools:
            raise ValueError(f"split {split!r} has no assets for sources {list(sources)}")
        self._rgba_cache: OrderedDict[tuple[str, str], Tensor] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rgba_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return self.length

    @property
    def assets(self) -> list[Asset]:
        """The assets this split draws from."""
        return [a for pool in self.pools.values() for a in pool]

    def asset_rgba(self, asset: Asset) -> Tensor:
        """Premultiplied float ``[4, h, w]`` of an asset; shrunk (antialiased) so its longest side is at
        most twice the canvas' longest, which bounds memory and work for big clip-art."""
        key = (asset.source, asset.key)
        if key in self._rgba_cache:
            self._rgba_cache.move_to_end(key)
            return self._rgba_cache[key]
        if asset.source == "emoji":
            array = self._emoji.rgba(asset.key)
        else:
            array = read_clipart_rgba(self.clipart_root, asset.key)
        rgba = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
        rgba = torch.cat([rgba[:3] * rgba[3:], rgba[3:]])
        limit = 2 * max(self.height, self.width)
        if max(rgba.shape[1:]) > limit:
            s = limit / max(rgba.shape[1:])
            hw = (max(1, round(rgba.shape[1] * s)), max(1, round(rgba.shape[2] * s)))
            rgba = F.interpolate(rgba[None], hw, mode="bilinear", antialias=True, align_corners=False)[0]
        self._rgba_cache[key] = rgba
        total = sum(t.numel() * 4 for t in self._rgba_cache.values())
        while total > _CACHE_BYTES and len(self._rgba_cache) > 1:
            _, old = self._rgba_cache.popitem(last=False)
            total -= old.numel() * 4
        return rgba

    def _place(self, rng: np.random.Generator) -> tuple[Asset, Tensor, Tensor] | None:
        """Draw one object: (asset, canvas alpha [H, W], canvas premultiplied rgb [3, H, W])."""
        H, W = self.height, self.width
        sources = list(self.pools)
        for _ in range(16):
            pool = self.pools[sources[int(rng.integers(len(sources)))]]
            asset = pool[int(rng.integers(len(pool)))]
            longest = max(4, round(rng.uniform(*self.scale) * min(H, W)))
            src = self.asset_rgba(asset)
            s = longest / max(src.shape[1:])
            h, w = max(1, round(src.shape[1] * s)), max(1, round(src.shape[2] * s))
            obj = F.interpolate(src[None], (h, w), mode="bilinear", antialias=True, align_corners=False)[0]
            a = obj[3].clamp(0, 1)
            rgb = torch.minimum(obj[:3].clamp(min=0), a)
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            if float(a.max()) < ALPHA_THRESHOLD:
                continue
            alpha = torch.zeros(H, W)
            alpha[y : y + h, x : x + w] = a
            prgb = torch.zeros(3, H, W)
            prgb[:, y : y + h, x : x + w] = rgb
            return asset, alpha, prgb
        return None

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index, stream])

    def render(self, index: int) -> Scene:
        """The scene of item ``index`` (module docstring)."""
        rng = self._rng(index, 0)
        H, W = self.height, self.width
        kind = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        backdrop, background = draw_background(rng, kind, H, W)
        canvas = backdrop
        placed: list[SceneObject] = []
        segmentation = torch.zeros(H, W, dtype=torch.long)
        instances = torch.zeros(H, W, dtype=torch.long)
        for _ in range(int(rng.integers(self.objects[0], self.objects[1] + 1))):
            drawn = self._place(rng)
            if drawn is None:
                continue
            asset, alpha, prgb = drawn
            canvas = canvas * (1 - alpha) + prgb
            box = tight_box(alpha)
            assert box is not None  # _place only returns objects reaching the threshold
            on = alpha >= ALPHA_THRESHOLD
            segmentation[on] = asset.class_id
            instances[on] = len(placed) + 1
            placed.append(SceneObject(asset, alpha, box))
        if not placed:
            raise RuntimeError(f"scene {index}: no asset of split {self.split!r} could be placed")
        visible = torch.bincount(instances.flatten(), minlength=len(placed) + 1)[1:]
        class_label = placed[int(torch.argmax(visible))].asset.class_id
        caption = compose_caption([o.asset.caption for o in placed], background)
        objects = tuple(placed)
        image = canvas.clamp(0, 1)
        return Scene(image, backdrop, objects, background, caption, class_label, segmentation, instances)

    def _mask(self, scene: Scene, index: int) -> tuple[Tensor, int]:
        rng = self._rng(index, 1)
        mode = self.mask_mode
        if mode == "random":
            mode = MASK_MODES[int(rng.integers(3))]
        if mode == "object":
            k = int(rng.integers(len(scene.objects)))
            return scene.objects[k].alpha[None].clone(), k
        if mode == "box":
            return random_box_mask(rng, self.height, self.width), -1
        return random_brush_mask(rng, self.height, self.width), -1

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.render(index)
        n_max = self.objects[1]
        boxes = torch.zeros(n_max, 4)
        box_classes = torch.full((n_max,), -1, dtype=torch.long)
        for i, obj in enumerate(scene.objects):
            boxes[i] = torch.tensor(obj.box)
            box_classes[i] = obj.asset.class_id
        mask, mask_object = self._mask(scene, index)
        item: dict[str, Any] = {
            "image": scene.image * 2 - 1,
            "caption": scene.caption,
            "class_label": scene.class_label,
            "boxes": boxes,
            "box_classes": box_classes,
            "num_objects": len(scene.objects),
            "segmentation": scene.segmentation,
            "mask": mask,
            "mask_object": mask_object,
            "index": index,
        }
        if self.lowres is not None:
            item["lowres"] = self._lowres(scene.image, index) * 2 - 1
        return item

    def _lowres(self, image: Tensor, index: int) -> Tensor:
        from ldm_sdk.encoders.degradations import bicubic_downsample, degrade_bsr

        if self.lowres == "bicubic":
            return bicubic_downsample(image[None], self.lowres_factor)[0].clamp(0, 1)
        seed = int(self._rng(index, 2).integers(2**62))
        generator = torch.Generator().manual_seed(seed)
        return degrade_bsr(image[None], generator, scale=self.lowres_factor)[0].clamp(0, 1)


def layout_objects(boxes: Tensor, box_classes: Tensor) -> list[Any]:
    """One item's ``boxes`` / ``box_classes`` as :class:`~ldm_sdk.encoders.layout.LayoutObject` s (unused
    rows dropped), for :class:`~ldm_sdk.encoders.layout.LayoutTokenizer` with
    ``n_object_classes=len(SCENE_CLASSES)``."""
    from ldm_sdk.encoders.layout import LayoutObject

    return [
        LayoutObject(int(c), (b[0], b[1], b[2], b[3]))
        for b, c in zip(boxes.tolist(), box_classes.tolist(), strict=True)
        if c >= 0
    ]
