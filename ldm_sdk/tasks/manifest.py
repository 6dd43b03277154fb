"""Manifests: everything needed to re-run a task, stored with its outputs; :func:`replay` re-runs one.

A :class:`Manifest` records the task, the full request, the resolved sampler settings (sampler, timesteps,
guidance, eta, seeds), the model (file sha256 -- the runtime cache key's content hash --, its config JSON,
EMA), the inputs (sha256 of each image's / mask's decoded pixels with their shape, and of its file), the
plugins and versions (ldm-sdk, torch, numpy, Pillow, Python), the device and the dtype. Outputs carry it in
the PNG text chunk ``ldm-sdk-manifest`` and in a JSON sidecar ``<name>.json``; a batch item's manifest
(:meth:`Manifest.for_item`) has ``batch_index`` set and its own seed.

:func:`replay` runs the recorded request again: batch item ``i`` as a single run with ``seed + i`` (equal to
the batch item by construction), on the recorded device and dtype, with the model and inputs checked
against their recorded hashes. On the same device, dtype and versions the pixels come out bit-identical.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ldm_sdk.tasks.base import TaskError, TaskInputs, TaskRequest, TaskResult, format_validation_error
from ldm_sdk.tasks.images import MANIFEST_KEY

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_KEY",
    "InputRecord",
    "Manifest",
    "ModelRecord",
    "PluginRecord",
    "input_record",
    "model_record",
    "read_manifest",
    "replay",
    "versions",
]

MANIFEST_FORMAT = "ldm-sdk-manifest/1"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelRecord(_Record):
    """The model a run used: file path, sha256 (of the file, or of a folder's files), config JSON."""

    path: str | None
    sha256: str | None
    family: str
    config: dict[str, Any]
    use_ema: bool = False


class InputRecord(_Record):
    """One input: its role (``image``, ``mask`` ...), file and the sha256 of its pixels (array shape, dtype
    and bytes, as the task read them) and of the file when there was one."""

    role: str
    path: str | None
    file_sha256: str | None
    pixels_sha256: str
    shape: list[int]


class PluginRecord(_Record):
    name: str
    version: str
    distribution: str


class Manifest(_Record):
    """What a task run did; enough to replay it (:func:`replay`)."""

    format: str = MANIFEST_FORMAT
    task: str
    request: dict[str, Any]
    batch_index: int | None = None
    seeds: list[int]
    sampler: str
    steps: int
    spacing: str
    timesteps: list[float]
    guidance: float
    eta: float | None
    model: ModelRecord
    inputs: list[InputRecord] = Field(default_factory=list)
    plugins: list[PluginRecord] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    device: str
    dtype: str
    created: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    def for_item(self, index: int) -> Manifest:
        """The manifest of batch item ``index`` (its own seed; the request is kept whole)."""
        if self.batch_index is not None:
            if index != 0:
                raise IndexError(f"this manifest is already batch item {self.batch_index}'s")
            return self
        if not 0 <= index < len(self.seeds):
            raise IndexError(f"batch item {index} out of range: the run made {len(self.seeds)} image(s)")
        return self.model_copy(update={"batch_index": index, "seeds": [self.seeds[index]]})

    def item_request(self) -> dict[str, Any]:
        """The request that makes exactly this manifest's image(s): batch item ``i`` -> batch 1 with its
        seed; an item of a group sampled together (``batch_mode="together"``) -> that group (its size, its
        first seed), whose image :meth:`item_in_request` it is: the same item alone would differ by the
        network's rounding at the other batch size."""
        if self.batch_index is None:
            return dict(self.request)
        start, size = self._group()
        return {**self.request, "batch": size, "seed": self.seeds[0] - (self.batch_index - start)}

    def item_in_request(self) -> int:
        """Which image of :meth:`item_request`'s run is this manifest's (0 unless a group was sampled
        together)."""
        if self.batch_index is None:
            return 0
        return self.batch_index - self._group()[0]

    def _group(self) -> tuple[int, int]:
        """``(first item, items)`` of the sampler loop that made batch item ``batch_index``."""
        assert self.batch_index is not None
        batch = self.extra.get("batch") or {}
        if batch.get("mode") != "together":
            return self.batch_index, 1
        start = 0
        for size in batch.get("groups", []):
            if self.batch_index < start + size:
                return start, int(size)
            start += int(size)
        raise TaskError(
            f"the manifest is batch item {self.batch_index}'s, but its extra['batch'] groups "
            f"{batch.get('groups')} cover only {start} item(s)"
        )


# -- building ----------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions that change numbers: ldm-sdk, torch, numpy, Pillow, Python."""
    import PIL
    import torch

    from ldm_sdk import __version__

    return {
        "ldm-sdk": __version__,
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def plugin_records(runtime: Runtime) -> list[PluginRecord]:
    return [
        PluginRecord(name=p.name, version=p.version, distribution=p.distribution)
        for p in runtime.plugins()
        if p.enabled
    ]


def model_record(bundle: ModelBundle, request: TaskRequest, runtime: Runtime) -> ModelRecord:
    """The model's record: sha256 from the runtime's cache key for a model file, else from the file the
    in-memory bundle was loaded from (None when it was built in memory)."""
    path: str | None = None
    sha: str | None = None
    if request.model is not None and Path(request.model).expanduser().exists():
        path = str(Path(request.model).expanduser().resolve())
        sha = runtime.model_key(path, request.config).content
    else:
        source = getattr(bundle, "source", None)
        source_path = getattr(source, "path", None)
        if source_path is not None and Path(source_path).exists():
            path = str(Path(source_path).resolve())
            sha = str(source.sha256)  # type: ignore[union-attr]
    return ModelRecord(
        path=path,
        sha256=sha,
        family=bundle.family,
        config=bundle.config.model_dump(mode="json"),
        use_ema=request.use_ema,
    )


def input_record(role: str, pixels: np.ndarray, path: str | os.PathLike[str] | None) -> InputRecord:
    from ldm_sdk.checkpoints.safe_load import file_sha256
    from ldm_sdk.tasks.images import array_sha256

    file = Path(path).expanduser().resolve() if path is not None else None
    return InputRecord(
        role=role,
        path=str(file) if file is not None else None,
        file_sha256=file_sha256(file) if file is not None and file.is_file() else None,
        pixels_sha256=array_sha256(pixels),
        shape=list(pixels.shape),
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- reading -----------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest in a PNG written by a task (text chunk ``ldm-sdk-manifest``) or in a JSON sidecar."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"manifest file not found: {p} (pass a PNG written by ldm-sdk or its .json sidecar)")
    head = p.read_bytes()[:8]
    if head.startswith(b"\x89PNG"):
        from PIL import Image

        try:
            with Image.open(p) as img:
                text = img.text.get(MANIFEST_KEY) if hasattr(img, "text") else None  # type: ignore[attr-defined]
        except OSError as exc:
            raise TaskError(f"{p} could not be read as a PNG: {exc}") from None
        if text is None:
            raise TaskError(f"{p} holds no ldm-sdk manifest (no {MANIFEST_KEY!r} text chunk)")
    else:
        try:
            text = p.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TaskError(f"{p} is neither a PNG written by ldm-sdk nor a JSON manifest") from None
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise TaskError(f"{p}: invalid ldm-sdk manifest: {format_validation_error(exc)}") from None
    if manifest.format != MANIFEST_FORMAT:
        raise TaskError(
            f"{p}: manifest format {manifest.format!r} is not supported; valid: {MANIFEST_FORMAT}"
        )
    return manifest


# -- replaying ---------------------------------------------------------------------------------------------
def replay(
    manifest: Manifest | str | os.PathLike[str],
    runtime: Runtime,
    *,
    inputs_dir: str | os.PathLike[str] | None = None,
    inputs: TaskInputs | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    callback: StepCallback | None = None,
) -> TaskResult:
    """Run the manifest's request again and return the result.

    The model is the recorded file (or ``model`` / ``inputs.bundle``; a file found under ``inputs_dir`` by
    name), checked against the recorded sha256. Input images and masks are read from their recorded paths,
    or by file name from ``inputs_dir``, or taken from ``inputs``; their pixels must match the recorded
    hashes. ``device`` / ``dtype`` default to the recorded ones (bit-exact replays need the same).
    """
    from ldm_sdk.tasks import get_task

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    task = get_task(manifest.task, runtime)
    data = manifest.item_request()
    data["device"] = device or manifest.device
    data["dtype"] = dtype or manifest.dtype
    given = inputs or TaskInputs()
    if given.bundle is None:
        data["model"] = str(_find_model(manifest, runtime, model, inputs_dir))
    given_images = {"image": given.image, "mask": given.mask, **given.extra}
    for record in manifest.inputs:
        if given_images.get(record.role) is not None:
            continue
        if record.role not in data:
            raise TaskError(
                f"the run's {record.role!r} input was given in memory; pass it again "
                f"(inputs=TaskInputs(extra={{{record.role!r}: ...}}))"
            )
        found = _find_input(record, inputs_dir)
        data[record.role] = str(found)
    try:
        request = task.request_type.model_validate(data)
    except ValidationError as exc:
        raise TaskError(f"the manifest's request is invalid: {format_validation_error(exc)}") from None
    result = task(request, runtime, inputs=given, callback=callback)
    if len(result.images) > 1 and manifest.batch_index is not None:  # the item's group ran again: its image
        k = manifest.item_in_request()
        latents = result.latents[k : k + 1] if result.latents is not None else None
        item = result.manifest.for_item(k)
        result = replace(result, images=[result.images[k]], manifest=item, latents=latents)
    recorded = {r.role: r.pixels_sha256 for r in manifest.inputs}
    for record in result.manifest.inputs:
        want = recorded.get(record.role)
        if want is not None and record.pixels_sha256 != want:
            raise TaskError(
                f"the {record.role} used now ({record.path or 'in memory'}) differs from the recorded one "
                f"(pixels sha256 {record.pixels_sha256[:12]} vs {want[:12]})"
            )
    return result


def _find_model(
    manifest: Manifest,
    runtime: Runtime,
    model: str | os.PathLike[str] | None,
    inputs_dir: str | os.PathLike[str] | None,
) -> Path:
    recorded = manifest.model.path or manifest.request.get("model")
    candidates: list[Path] = []
    if model is not None:
        candidates.append(Path(model).expanduser())
    if recorded and inputs_dir is not None:
        candidates.append(Path(inputs_dir) / Path(recorded).name)
    if recorded:
        candidates.append(Path(recorded).expanduser())
    for path in candidates:
        if not path.exists():
            continue
        if manifest.model.sha256 is not None:
            sha = runtime.model_key(path, manifest.request.get("config")).content
            if sha != manifest.model.sha256:
                raise TaskError(
                    f"model {path} is not the one the run used (sha256 {sha[:12]}..., recorded "
                    f"{manifest.model.sha256[:12]}...)"
                )
        return path
    if not recorded and model is None:
        raise TaskError("the run used a model given in memory; pass it again (inputs=TaskInputs(bundle=...))")
    raise TaskError(
        f"the run's model {recorded} was not found"
        + (f" (nor in {inputs_dir})" if inputs_dir else "")
        + "; pass --model / model= or --inputs-dir"
    )


def _find_input(record: InputRecord, inputs_dir: str | os.PathLike[str] | None) -> Path:
    if record.path is None:
        raise TaskError(
            f"the run's {record.role} was given in memory, not as a file; pass it again "
            f"(inputs=TaskInputs({record.role}=...))"
        )
    candidates = [Path(inputs_dir) / Path(record.path).name] if inputs_dir is not None else []
    candidates.append(Path(record.path))
    for path in candidates:
        if path.is_file():
            return path
    where = " or ".join(str(c) for c in candidates)
    raise TaskError(f"the run's {record.role} file was not found at {where}; pass --inputs-dir")
