"""Your own images: a folder tree, optional sidecar captions and labels, class labels from sub-folders.

Layout (``labels="subfolders"``; every image must then sit inside a class folder, at any depth)::

    root/
      cats/0001.jpg   cats/0001.txt      # caption as plain text (UTF-8, stripped)
      dogs/a/b.png    dogs/a/b.json      # {"caption": "...", "label": 3 or "dogs", ...}

Files are found once at construction (sorted, hidden files and folders skipped, ``extensions`` matched
case-insensitively); folders are not followed through symlinks, image symlinks are read. Sidecars share the
image's stem: ``name.txt`` gives the caption, ``name.json`` may give ``caption`` (it wins over the ``.txt``)
and ``label``; other JSON keys are ignored. A missing caption is ``""``.

``labels``: ``"subfolders"`` (class = first folder below ``root``; names sorted, or the fixed
``class_names`` you pass, e.g. the training set's for a validation set), ``"sidecar"`` (the JSON ``label``:
an int, or a name looked up in ``class_names`` / the sorted set of names found), ``"none"``. Unknown labels
are ``-1``.

Each item: ``image`` float ``[3, H, W]`` in [-1, 1] (EXIF orientation applied; transparency composited on
white; the shorter side resized to fit with PIL's antialiased bicubic, then ``crop="center"`` or
``"random"``; ``"none"`` resizes to exactly ``size`` ignoring the aspect ratio), ``caption``,
``class_label``, ``path`` (relative to ``root``, POSIX) and ``index``. ``flip`` mirrors horizontally with
probability 0.5. Random crops and flips draw from torch's global generator (which DataLoader seeds per
worker).

Errors: a missing root or one with no matching image raises at construction. An image that cannot be
decoded raises ``OSError`` naming it (``on_error="raise"``, the default: a broken file should be found, not
trained around); ``on_error="skip"`` logs one warning per bad file and returns the next readable item.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_MODES = ("sidecar", "none")
LABEL_MODES = ("subfolders", "sidecar", "none")
CROP_MODES = ("center", "random", "none")


def find_images(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``root`` (relative paths, sorted), skipping hidden files and folders."""
    found: list[Path] = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found)


def read_sidecar_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"sidecar {path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"sidecar {path} must hold a JSON object like {{'caption': ...}}; got {type(data)}")
    return data


def load_rgb(path: Path) -> Any:
    """A PIL RGB image: EXIF orientation applied, transparency composited on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


class ImageFolderDataset(Dataset[dict[str, Any]]):
    """Images of a folder tree (module docstring). ``size``: int or ``(height, width)``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int | tuple[int, int] = 256,
        *,
        captions: str = "sidecar",
        labels: str = "subfolders",
        class_names: list[str] | None = None,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        crop: str = "center",
        flip: bool = False,
        on_error: str = "raise",
    ) -> None:
        for value, valid, what in (
            (captions, CAPTION_MODES, "captions"),
            (labels, LABEL_MODES, "labels"),
            (crop, CROP_MODES, "crop"),
            (on_error, ("raise", "skip"), "on_error"),
        ):
            if value not in valid:
                raise ValueError(f"unknown {what} mode {value!r}; valid modes are {list(valid)}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        self.height, self.width = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.height, self.width) < 1:
            raise ValueError(f"size must be positive; got {size}")
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.files = find_images(self.root, self.extensions)
        if not self.files:
            raise ValueError(f"no images with extensions {list(self.extensions)} under {self.root}")
        self.captions, self.labels_mode, self.crop, self.flip = captions, labels, crop, flip
        self.on_error = on_error
        self.class_names: list[str] = []
        self.class_labels: list[int] = self._labels(labels, class_names)
        self._bad: set[int] = set()

    def _labels(self, mode: str, class_names: list[str] | None) -> list[int]:
        if mode == "none":
            self.class_names = list(class_names or [])
            return [-1] * len(self.files)
        if mode == "subfolders":
            top = [f for f in self.files if len(f.parts) == 1]
            if top:
                raise ValueError(
                    f"labels='subfolders' needs every image inside a class folder; {len(top)} sit directly "
                    f"in {self.root} (e.g. {top[0]}); move them, or use labels='sidecar' or 'none'"
                )
            found = sorted({f.parts[0] for f in self.files})
            names = list(class_names) if class_names is not None else found
            unknown = sorted(set(found) - set(names))
            if unknown:
                raise ValueError(f"class folders {unknown} are not in class_names {names}")
            self.class_names = names
            return [names.index(f.parts[0]) for f in self.files]
        raw: list[Any] = []
        for f in self.files:
            side = self._sidecar(f, ".json")
            raw.append(read_sidecar_json(side).get("label") if side.is_file() else None)
        strings = sorted({r for r in raw if isinstance(r, str)})
        names = list(class_names) if class_names is not None else strings
        unknown = sorted(set(strings) - set(names))
        if unknown:
            raise ValueError(f"sidecar labels {unknown} are not in class_names {names}")
        self.class_names = names
        out = []
        for f, r in zip(self.files, raw, strict=True):
            if (r is not None and not isinstance(r, (int, str))) or isinstance(r, bool):
                raise ValueError(f"label of {self._sidecar(f, '.json')} must be an int or a name; got {r!r}")
            out.append(-1 if r is None else names.index(r) if isinstance(r, str) else int(r))
        return out

    def _sidecar(self, rel: Path, suffix: str) -> Path:
        return (self.root / rel).with_suffix(suffix)

    def caption(self, index: int) -> str:
        """The caption of image ``index`` (``""`` when it has none or ``captions="none"``)."""
        if self.captions == "none":
            return ""
        rel = self.files[index]
        side = self._sidecar(rel, ".json")
        if side.is_file():
            caption = read_sidecar_json(side).get("caption")
            if caption is not None:
                if not isinstance(caption, str):
                    raise ValueError(f"caption in {side} must be a string; got {caption!r}")
                return caption.strip()
        txt = self._sidecar(rel, ".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""

    def __len__(self) -> int:
        return len(self.files)

    def _pixels(self, path: Path) -> torch.Tensor:
        from PIL import Image

        im = load_rgb(path)
        H, W = self.height, self.width
        if self.crop == "none":
            im = im.resize((W, H), Image.BICUBIC)
        else:
            s = max(H / im.height, W / im.width)
            new = (max(W, round(im.width * s)), max(H, round(im.height * s)))
            if new != im.size:
                im = im.resize(new, Image.BICUBIC)
            if self.crop == "center":
                top, left = (im.height - H) // 2, (im.width - W) // 2
            else:
                top = int(torch.randint(0, im.height - H + 1, ()))
                left = int(torch.randint(0, im.width - W + 1, ()))
            im = im.crop((left, top, left + W, top + H))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x.contiguous()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            path = self.root / self.files[i]
            try:
                image = self._pixels(path)
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for broken files
                if self.on_error == "raise":
                    raise OSError(
                        f"cannot read image {path}: {e}; pass on_error='skip' to skip unreadable files"
                    ) from e
                if i not in self._bad:
                    self._bad.add(i)
                    logger.warning("skipping unreadable image %s: %s", path, e)
                continue
            return {
                "image": image,
                "caption": self.caption(i),
                "class_label": self.class_labels[i],
                "path": self.files[i].as_posix(),
                "index": i,
            }
        raise OSError(f"no image under {self.root} could be read")


#: the name :mod:`ldm_sdk.training.batches` uses (``--data folder:PATH``)
ImageFolder = ImageFolderDataset
