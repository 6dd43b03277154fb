"""Images in and out of tasks: reading files, converting to and from [-1, 1] tensors, fitting sizes, writing.

Pixel conventions: images are uint8 ``H x W x 3`` RGB arrays (``read_image(..., mode="RGBA")`` keeps alpha);
masks are float32 ``H x W`` arrays in [0, 1] where **1 (white) marks the region to repaint**. Tensors for the
first stage are ``[B, 3, H, W]`` in [-1, 1]. Nothing is ever resized: a size that does not fit the model is
an error, or explicitly padded / cropped (:func:`fit_array`).

Outputs are written all-or-nothing (:func:`save_outputs`): every file goes to a temporary name in its
folder and is renamed into place only when all of them were written.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ldm_sdk.tasks.base import ImageLike, TaskError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ldm_sdk.tasks.base import TaskResult
    from ldm_sdk.tasks.manifest import Manifest

__all__ = [
    "Fit",
    "array_sha256",
    "as_mask",
    "as_rgb",
    "fit_array",
    "open_image",
    "output_paths",
    "read_image",
    "read_mask",
    "save_outputs",
    "tensor_to_images",
    "to_tensor",
    "unfit_array",
    "write_png",
]

FitMode = Literal["error", "pad", "crop"]


# -- reading -----------------------------------------------------------------------------------------------
def open_image(path: str | os.PathLike[str], what: str = "image", *, mode: str | None = None) -> Image.Image:
    """The image file at ``path`` loaded into memory, as stored (``mode=None``: a palette image keeps its
    indices) or converted to ``mode`` ("RGB", "RGBA", "L" ...). A missing, unreadable or non-image file is a
    :class:`TaskError` naming the input as ``what``."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.exists():
        raise TaskError(f"{what} file not found: {p}")
    if p.is_dir():
        raise TaskError(f"{what} {p} is a folder; pass an image file (PNG, JPEG, WebP, TIFF, ...)")
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy() if mode is None else img.convert(mode)
    except UnidentifiedImageError:
        raise TaskError(f"{what} {p} is not an image file (PNG, JPEG, WebP, TIFF, ... are read)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise TaskError(f"{what} {p} could not be read (truncated or corrupt image?): {exc}") from None


def read_image(path: str | os.PathLike[str], mode: Literal["RGB", "RGBA"] = "RGB") -> np.ndarray:
    """An image file as a uint8 ``H x W x 3`` (or ``x 4``) array; alpha is dropped for ``RGB``."""
    return np.asarray(open_image(path, "image", mode=mode), dtype=np.uint8).copy()


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask file as float32 ``H x W`` in [0, 1]: its luminance (white = 1 = repaint). A mask with
    transparency uses its alpha channel (opaque = repaint) when its colour channels are all one value."""
    img = open_image(path, "mask")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[..., 3]
        if alpha.min() < 255 and np.all(rgba[..., :3] == rgba[..., :1]) and rgba[..., 0].min() == rgba.max():
            return alpha.astype(np.float32) / 255.0
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


# -- converting --------------------------------------------------------------------------------------------
def as_rgb(image: ImageLike, *, what: str = "image") -> np.ndarray:
    """Any :data:`~ldm_sdk.tasks.base.ImageLike` as a uint8 ``H x W x 3`` array (a path is read)."""
    if isinstance(image, str | os.PathLike):
        return read_image(image)
    arr = _to_numpy(image, what)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise TaskError(f"{what} must be H x W, H x W x 3 or H x W x 4; got shape {arr.shape}")
    arr = _to_uint8(arr, what)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def as_mask(mask: ImageLike, *, what: str = "mask") -> np.ndarray:
    """Any mask-like input as float32 ``H x W`` in [0, 1] (1 = repaint); RGB masks use their luminance."""
    if isinstance(mask, str | os.PathLike):
        return read_mask(mask)
    arr = _to_numpy(mask, what)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32) if arr.ndim == 2 else as_mask(arr.astype(np.uint8) * 255, what=what)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        from PIL import Image

        return np.asarray(Image.fromarray(_to_uint8(arr[..., :3], what)).convert("L"), np.float32) / 255.0
    if arr.ndim != 2:
        raise TaskError(f"{what} must be H x W (or H x W x 1/3/4); got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    out = arr.astype(np.float32)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise TaskError(f"a float {what} must lie in [0, 1] (1 = repaint); use uint8 for 0..255 values")
    return out


def _to_numpy(image: Any, what: str) -> np.ndarray:
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor in [-1, 1], CHW or 1CHW
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise TaskError(f"a tensor {what} must be [3, H, W] or [1, 3, H, W]; got {list(t.shape)}")
        return tensor_to_images(t[None])[0] if t.shape[0] == 3 else ((t[0] + 1) / 2).clamp(0, 1).numpy()
    if isinstance(image, np.ndarray):
        return image
    raise TaskError(f"{what} must be a path, PIL image, numpy array or tensor; got {type(image).__name__}")


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise TaskError(f"a float {what} array must lie in [0, 1]; use uint8 for 0..255 values")
        return np.round(arr * 255.0).astype(np.uint8)
    raise TaskError(f"{what} array must be uint8 or float in [0, 1]; got dtype {arr.dtype}")


def to_tensor(
    images: np.ndarray | Sequence[np.ndarray], device: Any = None, dtype: Any = None
) -> torch.Tensor:
    """uint8 ``H x W x 3`` array(s) -> ``[B, 3, H, W]`` in [-1, 1] (``x / 127.5 - 1``)."""
    import torch

    batch = np.stack(list(images)) if not isinstance(images, np.ndarray) or images.ndim == 3 else images
    if batch.ndim == 3:
        batch = batch[None]
    t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return t.to(device=device, dtype=dtype or torch.float32)


def tensor_to_images(x: torch.Tensor) -> list[np.ndarray]:
    """``[B, 3, H, W]`` in about [-1, 1] -> uint8 ``H x W x 3`` arrays (clamped, rounded to nearest)."""
    import torch

    u = ((x.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(img.permute(1, 2, 0).numpy()) for img in u]


def array_sha256(arr: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes (what manifests record for input pixels)."""
    a = np.ascontiguousarray(arr)
    digest = hashlib.sha256(f"{a.dtype.str}{list(a.shape)}".encode())
    digest.update(a.tobytes())
    return digest.hexdigest()


# -- fitting sizes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """How an image was fitted: its original ``(height, width)``, the fitted one, and the mode."""

    mode: FitMode
    original: tuple[int, int]
    fitted: tuple[int, int]


def fit_array(arr: np.ndarray, multiple: int, mode: FitMode, *, pad_value: float | None = None) -> np.ndarray:
    """``arr`` (``H x W [x C]``) padded at the right / bottom to the next multiple (edge pixels replicated,
    or ``pad_value``), or cropped at the right / bottom to the previous one; ``mode="error"``: unchanged.
    """
    h, w = arr.shape[:2]
    if mode == "error" or (h % multiple == 0 and w % multiple == 0):
        return arr
    if mode == "crop":
        nh, nw = h // multiple * multiple, w // multiple * multiple
        if nh == 0 or nw == 0:
            raise TaskError(f"cannot crop a {w}x{h} image to a multiple of {multiple}: too small; use pad")
        return arr[:nh, :nw]
    nh, nw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    widths = [(0, nh - h), (0, nw - w)] + [(0, 0)] * (arr.ndim - 2)
    if pad_value is None:
        return np.pad(arr, widths, mode="edge")
    return np.pad(arr, widths, mode="constant", constant_values=pad_value)


def unfit_array(arr: np.ndarray, fit: Fit) -> np.ndarray:
    """Undo :func:`fit_array`'s padding (crop back to the original size); a crop stays cropped."""
    if fit.mode == "pad":
        return arr[: fit.original[0], : fit.original[1]]
    return arr


# -- writing -----------------------------------------------------------------------------------------------
MANIFEST_KEY = "ldm-sdk-manifest"


def write_png(path: str | os.PathLike[str], image: np.ndarray, manifest: Manifest | None = None) -> Path:
    """Write one PNG (manifest JSON in its ``ldm-sdk-manifest`` text chunk) atomically."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    if manifest is not None:
        info.add_itxt(MANIFEST_KEY, manifest.model_dump_json())
    tmp = _temp_name(path)
    try:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def output_paths(output: str | os.PathLike[str], count: int, *, stem: str) -> list[Path]:
    """Where ``count`` images go: an existing folder gets ``<stem>-0.png ...``; a ``.png`` file name is
    used as is for one image, and as ``name-0.png, name-1.png ...`` for a batch."""
    raw = str(output)
    out = Path(raw).expanduser()
    if out.is_dir() or raw.endswith(("/", os.sep)):
        if not out.is_dir():
            raise TaskError(f"output folder {out} does not exist; create it first")
        return [out / f"{stem}-{i}.png" for i in range(count)]
    if out.suffix.lower() != ".png":
        raise TaskError(f"output {out} must be a .png file or an existing folder (images are written as PNG)")
    if not out.parent.is_dir():
        raise TaskError(f"output folder {out.parent} does not exist; create it first")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_outputs(result: TaskResult, output: str | os.PathLike[str], *, sidecar: bool = True) -> list[Path]:
    """Write every image of ``result`` (with its item manifest in the PNG and, with ``sidecar``, as
    ``<name>.json``). All files are written to temporary names first and renamed only when all succeeded;
    on any error none of them exists."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    paths = output_paths(output, len(result.images), stem=result.manifest.task)
    written: list[tuple[Path, Path]] = []
    try:
        for i, (path, image) in enumerate(zip(paths, result.images, strict=True)):
            manifest = result.manifest.for_item(i)
            text = manifest.model_dump_json()
            info = PngInfo()
            info.add_itxt(MANIFEST_KEY, text)
            tmp = _temp_name(path)
            written.append((tmp, path))
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
            if sidecar:
                json_path = path.with_suffix(".json")
                tmp_json = _temp_name(json_path)
                written.append((tmp_json, json_path))
                tmp_json.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        renamed: list[Path] = []
        try:
            for tmp, final in written:
                os.replace(tmp, final)
                renamed.append(final)
        except BaseException:
            for final in renamed:
                final.unlink(missing_ok=True)
            raise
    except BaseException:
        for tmp, _final in written:
            tmp.unlink(missing_ok=True)
        raise
    return paths


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
