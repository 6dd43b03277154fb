"""Read a checkpoint file into a flat ``{key: tensor}`` dict plus metadata, never executing its code.

Formats (told apart by their first bytes, not by the file name):

- ``.safetensors``: read with ``safetensors``; its string metadata is kept.
- ``torch.save`` zip files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``): first ``torch.load(weights_only=True,
  mmap=True)``; when that refuses globals (real Lightning checkpoints name ``pytorch_lightning``, omegaconf,
  numpy and argparse classes), ``torch.load`` again with :class:`~.unpickler.RestrictedPickleModule`, which
  turns data-only classes into inert placeholders and refuses anything that could run code.
- legacy (pre-1.6, non-zip) ``torch.save`` files: the same two steps, without mmap.
- TorchScript archives and the pre-2018 tar format are refused.

Where the weights are inside the unpickled object: a Lightning checkpoint's ``state_dict``; else a nested
``model`` (plain training scripts) or ``module`` (DeepSpeed) dict, looked up to two levels deep; else the
tensors of the top-level dict itself. ``global_step``, ``epoch`` and other plain top-level values become
metadata; ``hyper_parameters`` is converted to plain data (placeholders as ``{"__inert__": "module.Class",
...}``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ldm_sdk.checkpoints.unpickler import InertObject, RestrictedPickleModule, UnsafeCheckpointError

Format = Literal["safetensors", "torch-zip", "torch-legacy"]
Reader = Literal["safetensors", "weights_only", "restricted"]

# Keys under which a checkpoint nests its state dict, in order of preference.
NESTING_KEYS = ("state_dict", "model", "module")
EMBEDDED_CONFIG_KEYS = ("ldm_sdk.config", "ldm_sdk_config")
_DICT_TYPES = (dict, OrderedDict, Counter)


class CheckpointReadError(ValueError):
    """The file is not a checkpoint we can read (wrong kind, corrupt, no tensors)."""


@dataclass
class CheckpointFile:
    """A checkpoint's weights as CPU tensors (flat keys) and its metadata."""

    path: Path
    format: Format
    tensors: dict[str, Tensor]
    metadata: dict[str, object] = field(default_factory=dict)
    reader: Reader = "safetensors"
    # ``module.Class`` of every class the restricted reader replaced by an inert placeholder
    placeholders: tuple[str, ...] = ()
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """SHA-256 of the file's bytes (streamed on first use, then cached)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def global_step(self) -> int | None:
        value = self.metadata.get("global_step")
        return _as_int(value)

    @property
    def embedded_config(self) -> str | None:
        """The ``ModelConfig`` JSON ldm-sdk wrote into the file, if it did."""
        for key in EMBEDDED_CONFIG_KEYS:
            value = self.metadata.get(key)
            if isinstance(value, str) and value:
                return value
        return None


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_format(path: Path) -> Format:
    """What kind of file this is, from its first bytes; :class:`CheckpointReadError` if none we read."""
    if path.is_dir():
        raise CheckpointReadError(
            f"{path} is a folder, not a checkpoint file; a diffusers folder is read by "
            "ldm_sdk.checkpoints.diffusers_format"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointReadError(
            f"{path} uses torch's pre-2018 tar format, which is not supported; re-save it with current torch"
        )
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointReadError(
        f"{path} is not a checkpoint: expected a .safetensors file or a torch.save file "
        f"(.ckpt/.pt/.pth/.bin), but its first bytes are {head[:8]!r}"
    )


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointFile:
    """Read ``path`` safely (see the module docstring). Raises :class:`CheckpointReadError`,
    :class:`~.unpickler.UnsafeCheckpointError` or ``FileNotFoundError``."""
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return _read_safetensors(path)
    obj, reader, placeholders = _torch_load(path, fmt)
    tensors, metadata = extract_weights(obj, path)
    return CheckpointFile(path, fmt, tensors, metadata, reader, placeholders)


def _read_safetensors(path: Path) -> CheckpointFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            metadata: dict[str, object] = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except SafetensorError as e:
        raise CheckpointReadError(f"{path} is not a readable .safetensors file: {e}") from None
    for key in ("global_step", "epoch"):
        number = _as_int(metadata.get(key))
        if number is not None:
            metadata[key] = number
    return CheckpointFile(path, "safetensors", tensors, metadata, "safetensors")


def _torch_load(path: Path, fmt: Format) -> tuple[Any, Reader, tuple[str, ...]]:
    mmap = fmt == "torch-zip"
    if mmap:
        _check_torch_zip(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap), "weights_only", ()
    except pickle.UnpicklingError:
        pass  # globals beyond torch's allowlist: read again with ours
    except Exception as e:
        raise CheckpointReadError(f"{path} could not be read as a torch checkpoint: {_one_line(e)}") from None
    module = RestrictedPickleModule()
    try:
        obj = torch.load(str(path), map_location="cpu", pickle_module=module, weights_only=False, mmap=mmap)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(e.refused, str(path), reason=e.reason) from None
    except Exception as e:
        raise CheckpointReadError(f"{path} could not be read as a torch checkpoint: {_one_line(e)}") from None
    return obj, "restricted", tuple(sorted(module.inert_classes))


def _check_torch_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:
        raise CheckpointReadError(f"{path} is a damaged zip file: {e}") from None
    if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
        raise CheckpointReadError(
            f"{path} is a TorchScript archive (a program, not a checkpoint); it is not loaded. "
            "Export the model's state_dict as .safetensors instead"
        )
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointReadError(f"{path} is a zip file but not a torch.save checkpoint (no data.pkl)")


# -- where the weights are -------------------------------------------------------------------------------
def extract_weights(
    obj: Any, path: Path | str = "<checkpoint>"
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Split an unpickled checkpoint into its flat state dict and plain metadata."""
    if type(obj) not in _DICT_TYPES:
        raise CheckpointReadError(f"{path} holds a {_type_name(obj)}, not a dict of tensors")
    metadata: dict[str, object] = {}
    container = obj
    for _depth in range(2):
        key = next((k for k in NESTING_KEYS if type(dict.get(container, k)) in _DICT_TYPES), None)
        if key is None:
            break
        _collect_metadata(container, exclude=key, into=metadata)
        if key != "state_dict":
            metadata.setdefault("nested_under", key)
        container = dict.__getitem__(container, key)
    tensors: dict[str, Tensor] = {}
    non_tensor: list[str] = []
    for key, value in dict.items(container):
        if type(value) in (Tensor, torch.nn.Parameter):
            if type(key) is not str:
                raise CheckpointReadError(f"{path}: state dict key {key!r} is not a string")
            tensors[key] = _clean_tensor(key, value, path)
        else:
            non_tensor.append(str(key))
    if not tensors:
        raise CheckpointReadError(
            f"{path} holds no tensors: top-level entries are {sorted(map(str, dict.keys(obj)))[:12]}; "
            f"weights are looked for under {', '.join(NESTING_KEYS)} or at top level"
        )
    if container is obj:
        _collect_metadata(container, exclude=None, into=metadata, skip=set(tensors))
    elif non_tensor:
        metadata["non_tensor_entries"] = non_tensor
    return tensors, metadata


def _clean_tensor(key: str, value: Tensor, path: Path | str) -> Tensor:
    if value.layout != torch.strided or value.device.type != "cpu":
        raise CheckpointReadError(
            f"{path}: entry {key!r} is a {value.layout} tensor on {value.device}; only dense CPU tensors "
            "with data are valid in a checkpoint"
        )
    # detach(): a plain Tensor without Python attributes, hooks or Parameter wrapper
    return value.detach()


def _collect_metadata(
    container: Any,
    *,
    exclude: str | None,
    into: dict[str, object],
    skip: frozenset[str] | set[str] = frozenset(),
) -> None:
    others: list[str] = []
    for key, value in dict.items(container):
        if key == exclude or key in skip or type(key) is not str:
            continue
        if key == "hyper_parameters" or _is_scalar(value):
            into.setdefault(key, to_plain(value))
        else:
            others.append(key)
    if others:
        into.setdefault("other_entries", others)


def _is_scalar(value: object) -> bool:
    if type(value) in (int, float, str, bool, type(None)):
        return True
    try:
        import numpy as np
    except ImportError:
        return False
    return isinstance(value, np.generic)


def to_plain(value: object, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> object:
    """JSON-like plain data from unpickled metadata; placeholders become ``{"__inert__": ...}`` dicts."""
    if _depth > 24 or id(value) in _seen:
        return "<...>"
    seen = _seen | {id(value)}
    kind = type(value)
    if kind in (int, float, str, bool, type(None)):
        return value
    if kind in (bytes, bytearray):
        return f"<{len(value)} bytes>"  # type: ignore[arg-type]
    if kind in _DICT_TYPES:
        return {_plain_key(k): to_plain(v, _depth + 1, seen) for k, v in dict.items(value)}  # type: ignore[arg-type]
    if kind in (list, tuple, set, frozenset):
        return [to_plain(v, _depth + 1, seen) for v in value]  # type: ignore[attr-defined]
    if isinstance(value, InertObject):
        out: dict[str, object] = {"__inert__": type(value).inert_class}
        for attr in ("args", "kwargs", "state", "dict_items", "list_items"):
            item = getattr(value, attr)
            if item:
                out[attr] = to_plain(item, _depth + 1, seen)
        return out
    if isinstance(value, type) and issubclass(value, InertObject):
        return {"__inert_class__": value.inert_class}
    if kind in (Tensor, torch.nn.Parameter):
        return f"<tensor {list(value.shape)} {value.dtype}>"  # type: ignore[attr-defined]
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return to_plain(value.item(), _depth + 1, seen)
        if isinstance(value, np.dtype):
            return str(value)
        if isinstance(value, np.ndarray):
            return (
                to_plain(value.tolist(), _depth + 1, seen) if value.size <= 64 else f"<ndarray {value.shape}>"
            )
    except ImportError:
        pass
    return f"<{_type_name(value)}>"


def _plain_key(key: object) -> str:
    if type(key) is str:
        return key
    plain = to_plain(key)
    return plain if isinstance(plain, str) else repr(plain)


def _type_name(value: object) -> str:
    if isinstance(value, InertObject):
        return type(value).inert_class
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _as_int(value: object) -> int | None:
    if type(value) is int:
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
