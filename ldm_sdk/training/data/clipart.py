"""Open Clip Art Library PNGs as captioned RGBA assets (apt ``openclipart-png``).

``/usr/share/openclipart/png/<category>/[<sub>/...]<name>.png``: about 6,900 distinct public-domain images
in 22 category folders, plus symlinks between categories. Assets are deduplicated by real path; an asset's
category is the top folder of its real path. RGBA / P / LA / RGB / L images are all read as RGBA (images
without transparency are opaque rectangles).

The package holds no titles, so a caption is made from the file name: lower case, ``_ - .`` as spaces,
numbering and a few file-name tags dropped (``an_apple_01.png`` -> ``an apple``; ``pear_simple_bw.png`` ->
``pear simple``). Names sometimes carry truncated author names (``apple_bitten_dan_gerhard_01`` ->
``apple bitten dan gerhard``): the captions are exact about *which file* is shown, not curated English.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLIPART_ROOT = Path("/usr/share/openclipart/png")

#: the category folders of openclipart-png (Debian 1:0.18); an unknown folder counts as "unsorted"
CLIPART_CATEGORIES: tuple[str, ...] = (
    "animals",
    "buildings",
    "buttons",
    "computer",
    "containers",
    "decorations",
    "education",
    "electronics",
    "food",
    "geography",
    "logos",
    "office",
    "people",
    "plants",
    "recreation",
    "science",
    "shapes",
    "signs_and_symbols",
    "special",
    "tools",
    "transportation",
    "unsorted",
)

_DROP_TOKENS = {"bw", "png", "svg", "simple"}
_NUMBERING = re.compile(r"^\d+[a-z]?$|^[a-z]?\d+$")


def clipart_caption(path: str | Path) -> str | None:
    """Caption of a clip-art file from its name (module docstring); ``None`` when nothing is left."""
    stem = Path(path).stem.lower()
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w]
    kept = [w for w in words if not _NUMBERING.match(w) and w not in _DROP_TOKENS]
    if not kept and words:
        kept = [w for w in words if not _NUMBERING.match(w)]
    return " ".join(kept) or None


@dataclass(frozen=True)
class ClipartFile:
    """One distinct clip-art image: path relative to the root (its real path), caption, category."""

    path: str
    caption: str
    category: str


def scan_clipart(root: str | Path = CLIPART_ROOT) -> list[ClipartFile]:
    """Every distinct ``*.png`` under ``root`` (deduplicated by real path), sorted by path."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    seen: dict[str, ClipartFile] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if not name.lower().endswith(".png"):
                continue
            real = Path(os.path.realpath(Path(dirpath) / name))
            try:
                rel = real.relative_to(real_root)
            except ValueError:  # a link out of the tree: not part of the collection
                continue
            key = rel.as_posix()
            caption = clipart_caption(rel)
            if key in seen or caption is None or not real.is_file():
                continue
            top = rel.parts[0] if len(rel.parts) > 1 else "unsorted"
            seen[key] = ClipartFile(key, caption, top if top in CLIPART_CATEGORIES else "unsorted")
    return [seen[k] for k in sorted(seen)]


def read_clipart_rgba(root: str | Path, path: str) -> np.ndarray:
    """``uint8 [H, W, 4]`` of one clip-art file (``path`` relative to ``root``)."""
    from PIL import Image

    with Image.open(Path(root) / path) as im:
        return np.asarray(im.convert("RGBA"))
