"""Precomputed first-stage latents: encode a dataset once, train the LDM on the stored latents.

:func:`encode_to_latents` runs every ``item["image"]`` of a dataset through a bundle's first stage and
writes one ``.safetensors`` shard (temporary file, then an atomic rename):

- ``posterior="mode"`` (default): tensor ``latent`` ``[N, C, h, w]``, already multiplied by the bundle's
  ``scale_factor`` (what :meth:`~ldm_sdk.checkpoints.bundle.ModelBundle.encode_first_stage` returns: the KL
  posterior mode, or a VQ first stage's pre-quantisation output);
- ``posterior="moments"`` (KL first stages only): tensors ``mean`` and ``std`` of the posterior, unscaled;
  :class:`LatentDataset` draws ``scale_factor * (mean + std * eps)`` per item, as CompVis'
  ``get_first_stage_encoding`` samples during training;
- the items' other ``keys`` (default ``class_label`` and ``caption``): tensors are stacked, numbers become a
  ``[N]`` tensor, strings go to the metadata as one JSON list;
- metadata (``ldm_sdk.latents.*``): format version, ``config_hash`` (SHA-256 of the first stage's config as
  sorted JSON), ``weights_hash`` (SHA-256 of its parameters and buffers), ``scale_factor``, family,
  posterior mode, count, latent shape.

:class:`LatentDataset` reads one or more shards back (concatenated in the order given) and, given the
bundle you train with, refuses shards encoded by another first stage or scale factor. Items:
``{"latent": [C, h, w], <keys>..., "index"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

META = "ldm_sdk.latents."
FORMAT_VERSION = "1"
POSTERIORS = ("mode", "moments")


def first_stage_config_hash(bundle: Any) -> str:
    """SHA-256 of the bundle's first-stage config (sorted JSON)."""
    config = bundle.config.first_stage.model_dump(mode="json")
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def first_stage_weights_hash(bundle: Any) -> str:
    """SHA-256 over the first stage's state dict (names, dtypes, shapes, values), in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(bundle.first_stage_model.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def encode_to_latents(
    bundle: Any,
    dataset: Dataset[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] = ("class_label", "caption"),
    posterior: str = "mode",
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
) -> Path:
    """Encode ``dataset`` into the shard ``path`` (module docstring); returns the path. Items lacking one
    of ``keys`` raise ``KeyError``; pass ``keys=()`` to store latents only."""
    from safetensors.torch import save_file

    from ldm_sdk.models.first_stage import AutoencoderKL

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"latent shards are .safetensors files; got {path.name!r}")
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; valid values are {list(POSTERIORS)}")
    fsm = bundle.first_stage_model
    if posterior == "moments" and not isinstance(fsm, AutoencoderKL):
        raise ValueError("posterior='moments' needs a KL first stage; this bundle's is VQ: use 'mode'")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("cannot encode an empty dataset")
    was_training = fsm.training
    fsm.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stored: dict[str, list[Tensor]] = {}
    strings: dict[str, list[str]] = {}
    try:
        for batch in loader:
            image = batch["image"].to(device=device, dtype=dtype)
            if posterior == "mode":
                outs = {"latent": bundle.encode_first_stage(image).float().cpu()}
            else:
                dist = fsm.encode(image)
                outs = {"mean": dist.mean.float().cpu(), "std": dist.std.float().cpu()}
            for k, v in outs.items():
                stored.setdefault(k, []).append(v)
            for key in keys:
                if key not in batch:
                    raise KeyError(f"dataset items have no key {key!r}; they have {sorted(batch)}")
                value = batch[key]
                if isinstance(value, Tensor):
                    stored.setdefault(key, []).append(value.cpu())
                else:
                    strings.setdefault(key, []).extend(str(s) for s in value)
    finally:
        fsm.train(was_training)
    tensors = {k: torch.cat(v).contiguous() for k, v in stored.items()}
    first = tensors["latent" if posterior == "mode" else "mean"]
    metadata = {
        "format": "pt",
        META + "version": FORMAT_VERSION,
        META + "config_hash": first_stage_config_hash(bundle),
        META + "weights_hash": first_stage_weights_hash(bundle),
        META + "scale_factor": repr(float(bundle.scale_factor)),
        META + "family": str(bundle.family),
        META + "posterior": posterior,
        META + "count": str(first.shape[0]),
        META + "latent_shape": json.dumps(list(first.shape[1:])),
        META + "strings": json.dumps(strings),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def shard_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """A shard file, a folder (its ``*.safetensors``, sorted by name) or a list of shard files."""
    if isinstance(paths, (str, os.PathLike)):
        path = Path(paths)
        shards = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if path.is_dir() and not shards:
            raise ValueError(f"folder {path} holds no .safetensors latent shards")
    else:
        shards = [Path(p) for p in paths]
    if not shards:
        raise ValueError("no latent shards given")
    return shards


class LatentDataset(Dataset[dict[str, Any]]):
    """Items of latent shards: one file, a folder of them, or a list (module docstring). ``bundle`` (or
    ``config_hash``) checks that the shards came from that first stage; ``check_weights`` also compares
    the weights' hash."""

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        bundle: Any | None = None,
        config_hash: str | None = None,
        check_weights: bool = False,
    ) -> None:
        from safetensors import safe_open

        shards = shard_paths(paths)
        expect = first_stage_config_hash(bundle) if bundle is not None else config_hash
        weights = first_stage_weights_hash(bundle) if bundle is not None and check_weights else None
        parts: list[dict[str, Tensor]] = []
        strings: dict[str, list[str]] = {}
        self.metadata: dict[str, str] = {}
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"latent shard {shard} does not exist")
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get(META + "version") != FORMAT_VERSION:
                    raise ValueError(f"{shard} is not an ldm-sdk latent shard (format {FORMAT_VERSION})")
                self._check(shard, meta, expect, weights, bundle)
                parts.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open API)
            for key, values in json.loads(meta[META + "strings"]).items():
                strings.setdefault(key, []).extend(values)
            self.metadata = meta
        names = set(parts[0])
        if any(set(p) != names for p in parts):
            raise ValueError(f"shards {[str(s) for s in shards]} store different keys")
        self.tensors = {k: torch.cat([p[k] for p in parts]) for k in sorted(names)}
        self.strings = strings
        self.posterior = self.metadata[META + "posterior"]
        self.scale_factor = float(self.metadata[META + "scale_factor"])
        self.length = int(self.tensors["latent" if self.posterior == "mode" else "mean"].shape[0])

    @staticmethod
    def _check(
        shard: Path, meta: dict[str, str], expect: str | None, weights: str | None, bundle: Any
    ) -> None:
        if expect is not None and meta[META + "config_hash"] != expect:
            raise ValueError(
                f"{shard} was encoded by a different first stage (config hash "
                f"{meta[META + 'config_hash'][:12]}, expected {expect[:12]}): re-encode it with this bundle"
            )
        if weights is not None and meta[META + "weights_hash"] != weights:
            raise ValueError(f"{shard} was encoded with different first-stage weights: re-encode it")
        if bundle is not None and float(meta[META + "scale_factor"]) != float(bundle.scale_factor):
            raise ValueError(
                f"{shard} was encoded with scale_factor {meta[META + 'scale_factor']}, the bundle has "
                f"{bundle.scale_factor}: re-encode it (or set the bundle's scale_factor)"
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} latents")
        index %= self.length
        item: dict[str, Any] = {"index": index}
        if self.posterior == "mode":
            item["latent"] = self.tensors["latent"][index]
        else:
            mean, std = self.tensors["mean"][index], self.tensors["std"][index]
            item["latent"] = self.scale_factor * (mean + std * torch.randn_like(mean))
        for key, value in self.tensors.items():
            if key not in ("latent", "mean", "std"):
                item[key] = value[index].item() if value.ndim == 1 else value[index]
        for key, values in self.strings.items():
            item[key] = values[index]
        return item
