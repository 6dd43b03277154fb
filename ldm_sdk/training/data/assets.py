"""The scene assets: emoji glyphs and clip-art files, a fixed class vocabulary, train/val splits, a cache.

**Class vocabulary** (:data:`SCENE_CLASSES`, 29 names, fixed whatever is installed): index 0 is
``"background"``; then the 22 openclipart-png category folders (``animals`` ... ``unsorted``); then the six
emoji groups of :data:`~ldm_sdk.training.data.emoji.EMOJI_GROUPS` (``emoji face`` ... ``emoji symbol``). The
same ids serve as ``class_label``, box classes and segmentation labels, so a class-conditional model needs
``n_classes = len(SCENE_CLASSES)`` (id 0 is never a ``class_label``).

**Splits** are by asset: an asset is in ``"val"`` when ``sha256(f"{split_seed}:{source}:{key}")`` read as a
fraction in [0, 1) is below ``val_fraction`` (default 0.1), else in ``"train"``; so train and val scenes never
share an emoji glyph or a clip-art file, and adding assets never moves the others.

**Cache**: scanning the font and the clip-art tree takes about a second; the index is written once as JSON to
``<cache dir>/scenes/assets-<fingerprint>.json`` (cache dir: ``cache_dir`` argument, else
:func:`ldm_sdk.cache_dir.cache_root`: ``$LDM_SDK_CACHE``, ``$XDG_CACHE_HOME/ldm-sdk`` or
``~/.cache/ldm-sdk``) through a temporary file and an atomic rename. The fingerprint covers the format
version, the Unicode database version and the size/mtime of the font and of the clip-art folders, so an
upgraded package makes a new index. Nothing is scanned at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ldm_sdk.training.data.clipart import CLIPART_CATEGORIES, CLIPART_ROOT, scan_clipart
from ldm_sdk.training.data.emoji import EMOJI_FONT, EMOJI_GROUPS, read_emoji_glyphs

Source = Literal["emoji", "clipart"]
Split = Literal["train", "val"]
SOURCES: tuple[str, ...] = ("emoji", "clipart")
SPLITS: tuple[str, ...] = ("train", "val")
SCENE_CLASSES: tuple[str, ...] = ("background", *CLIPART_CATEGORIES, *EMOJI_GROUPS)
APT_PACKAGES = {"emoji": "fonts-noto-color-emoji", "clipart": "openclipart-png"}
INDEX_VERSION = 1


@dataclass(frozen=True)
class Asset:
    """One object image: ``source``, ``key`` (emoji glyph name / clip-art path), ``caption``, ``class_id``."""

    source: str
    key: str
    caption: str
    class_id: int


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else the SDK's cache folder (:func:`ldm_sdk.cache_dir.cache_root`; not created here)."""
    from ldm_sdk.cache_dir import cache_root

    return Path(override) if override is not None else cache_root()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def missing_packages(sources: Sequence[str], emoji_font: Path, clipart_root: Path) -> list[str]:
    missing = []
    if "emoji" in sources and not emoji_font.is_file():
        missing.append(APT_PACKAGES["emoji"])
    if "clipart" in sources and not clipart_root.is_dir():
        missing.append(APT_PACKAGES["clipart"])
    return missing


def _check_sources(sources: Sequence[str], emoji_font: Path, clipart_root: Path) -> None:
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"unknown scene sources {bad or list(sources)}; valid sources are {list(SOURCES)}")
    missing = missing_packages(sources, emoji_font, clipart_root)
    if missing:
        where = {APT_PACKAGES["emoji"]: str(emoji_font), APT_PACKAGES["clipart"]: str(clipart_root)}
        raise FileNotFoundError(
            "the synthetic scenes need the Debian packages "
            + ", ".join(f"{p} ({where[p]} is missing)" for p in missing)
            + f"; install them with: apt-get install {' '.join(missing)}"
            + " (or pass sources=... naming only what is installed)"
        )


def _fingerprint(sources: Sequence[str], emoji_font: Path, clipart_root: Path) -> str:
    parts: list[str] = [f"v{INDEX_VERSION}", unicodedata.unidata_version, ",".join(sorted(sources))]
    if "emoji" in sources:
        st = emoji_font.stat()
        parts.append(f"{emoji_font.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    if "clipart" in sources:
        for d in [clipart_root, *sorted(p for p in clipart_root.iterdir() if p.is_dir())]:
            parts.append(f"{d.resolve()}:{d.stat().st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _scan(sources: Sequence[str], emoji_font: Path, clipart_root: Path) -> list[Asset]:
    assets: list[Asset] = []
    if "emoji" in sources:
        for g in read_emoji_glyphs(emoji_font):
            assets.append(Asset("emoji", g.glyph, g.caption, SCENE_CLASSES.index(g.group)))
    if "clipart" in sources:
        for c in scan_clipart(clipart_root):
            assets.append(Asset("clipart", c.path, c.caption, SCENE_CLASSES.index(c.category)))
    return assets


def load_asset_index(
    sources: Sequence[str] = SOURCES,
    *,
    emoji_font: str | os.PathLike[str] = EMOJI_FONT,
    clipart_root: str | os.PathLike[str] = CLIPART_ROOT,
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> list[Asset]:
    """Every asset of ``sources`` (module docstring), from the cache when it is there; raises a clear
    ``FileNotFoundError`` naming the apt packages to install when a source is absent."""
    font, root = Path(emoji_font), Path(clipart_root)
    _check_sources(sources, font, root)
    path = cache_dir(cache) / "scenes" / f"assets-{_fingerprint(sources, font, root)}.json"
    if use_cache and path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["assets"]
            return [Asset(**row) for row in rows]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file: rebuild it
    assets = _scan(sources, font, root)
    if use_cache:
        payload = {"version": INDEX_VERSION, "assets": [asdict(a) for a in assets]}
        with contextlib.suppress(OSError):  # a read-only cache dir costs speed, not correctness
            atomic_write_text(path, json.dumps(payload, separators=(",", ":")))
    return assets


def asset_split(asset: Asset, *, val_fraction: float = 0.1, split_seed: int = 0) -> str:
    """``"val"`` or ``"train"`` for ``asset`` (module docstring)."""
    digest = hashlib.sha256(f"{split_seed}:{asset.source}:{asset.key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def split_assets(
    assets: Sequence[Asset], split: str, *, val_fraction: float = 0.1, split_seed: int = 0
) -> list[Asset]:
    """The assets of one split, in index order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    return [a for a in assets if asset_split(a, val_fraction=val_fraction, split_seed=split_seed) == split]
