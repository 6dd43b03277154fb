"""Image folders for evaluation: listing, loading as tensors, pairing originals with reconstructions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: what torch-fidelity reads from a folder (its ``samples_find_ext``), so both count the same files
EVAL_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")


def list_images(folder: str | os.PathLike[str], extensions: tuple[str, ...] = EVAL_EXTENSIONS) -> list[Path]:
    """Image files under ``folder``, relative, sorted; raises for a missing folder or one without images."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    files = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in extensions and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(f"no images with extensions {list(extensions)} under {root}")
    return files


def load_image(path: str | os.PathLike[str]) -> Tensor:
    """float ``[3, H, W]`` in [-1, 1] (RGB; an alpha channel is dropped, as torch-fidelity does)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def paired_images(
    real_dir: str | os.PathLike[str], other_dir: str | os.PathLike[str]
) -> list[tuple[Path, Path, Path]]:
    """``(relative path, real file, other file)`` for every image of ``real_dir``, matched by relative path
    (extension ignored: ``a/1.png`` pairs ``a/1.jpg``); raises when either side has unmatched files."""
    real_root, other_root = Path(real_dir), Path(other_dir)
    real = {p.with_suffix(""): p for p in list_images(real_root)}
    other = {p.with_suffix(""): p for p in list_images(other_root)}
    missing, extra = sorted(set(real) - set(other)), sorted(set(other) - set(real))
    if missing or extra:
        raise ValueError(
            f"{other_root} must hold one image per image of {real_root}, with the same relative name; "
            f"missing {len(missing)} (e.g. {[str(m) for m in missing[:3]]}), "
            f"unmatched {len(extra)} (e.g. {[str(e) for e in extra[:3]]})"
        )
    return [(real[k], real_root / real[k], other_root / other[k]) for k in sorted(real)]
