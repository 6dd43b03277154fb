"""The runtime's model cache: one copy of each model, under a memory budget, least recently used out first.

Entries are keyed by :class:`ModelKey` (checkpoint content hash + config + dtype + device) and remember the
loader that built them, so an evicted model is reloaded on demand. A model's size is the sum of its parameter
and buffer bytes. When a model would push the cache over its budget, the least recently used models leave
first; a model larger than the whole budget is still kept (alone), with a warning. Two threads asking for the
same key at once load it once: the second waits for the first.

Objects derived from a loaded model that must not outlive its stay on the device -- the tasks' captured CUDA
graphs, which read the weights from the addresses they had at capture -- are kept with its entry
(:meth:`ModelCache.attachment`) and dropped whenever the model leaves (eviction, release, offload, clear).
They are not part of the model's bytes: the budget counts weights, as it leaves out activations.

The device's memory can run out before the budget does. A load that runs out of device memory frees what
it can on that device and tries again: first what is kept with the resident models (their graphs), then
those models, least recently used first, one per try. A task whose graph capture finds the device full
asks for the same (:meth:`ModelCache.make_room`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ldm_sdk.file_hashes import Stamp, file_stamp

logger = logging.getLogger("ldm_sdk.runtime")

Loader = Callable[[], nn.Module]
T = TypeVar("T")


@dataclass(frozen=True)
class ModelKey:
    """Identity of a loaded model: what was read (content hash), how (config, variant) and where it lives."""

    content: str
    config: str = ""
    dtype: str = "fp32"
    device: str = "cpu"
    variant: str = ""

    def __str__(self) -> str:
        extra = f"/{self.config[:8]}" if self.config else ""
        variant = f"/{self.variant}" if self.variant else ""
        return f"{self.content[:12]}{extra}{variant}@{self.device}/{self.dtype}"


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    resident_bytes: int
    budget_bytes: int | None
    models: int


class UnknownModelError(KeyError):
    """``ModelCache.get(key)`` without a loader for a key the cache has never seen."""

    def __init__(self, key: ModelKey, known: list[ModelKey]) -> None:
        super().__init__(key)
        self.key, self.known = key, known

    def __str__(self) -> str:
        known = ", ".join(str(k) for k in self.known) or "none"
        return f"model {self.key} was never loaded and no loader was given; known models: {known}"


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    tensors = [*module.parameters(), *module.buffers()]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@dataclass
class _Entry:
    loader: Loader
    model: nn.Module | None = None
    nbytes: int = 0  # last measured size; kept after eviction to make room before a reload
    offloaded: bool = False
    attached: dict[str, Any] = field(default_factory=dict)  # ModelCache.attachment(); not in nbytes

    def leave(self, *, offload: bool = False) -> None:
        """The model leaves its device: dropped (or only marked offloaded), its attachments dropped."""
        if offload:
            self.offloaded = True
        else:
            self.model = None
        self.attached = {}


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    model: nn.Module | None = None
    error: BaseException | None = None


class ModelCache:
    """Thread-safe LRU of loaded models under ``budget_bytes`` (``None``: unbounded)."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        *,
        on_loaded: Callable[[ModelKey, nn.Module], None] | None = None,
        on_evicted: Callable[[ModelKey, str], None] | None = None,
    ) -> None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"memory budget must be a positive number of bytes or None, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._on_loaded = on_loaded
        self._on_evicted = on_evicted
        self._lock = threading.Lock()
        self._entries: OrderedDict[ModelKey, _Entry] = OrderedDict()  # LRU first, MRU last
        self._loading: dict[ModelKey, _Pending] = {}
        self._hits = self._misses = self._evictions = 0

    # -- public --------------------------------------------------------------------------------------
    def get(self, key: ModelKey, loader: Loader | None = None) -> nn.Module:
        """The model for ``key``; on a miss, loaded with ``loader`` or the loader remembered for ``key``."""
        evicted: list[tuple[ModelKey, str]] = []
        with self._lock:
            entry = self._entries.get(key)
            if loader is not None:
                if entry is None:
                    entry = self._entries[key] = _Entry(loader)
                else:
                    entry.loader = loader
            if entry is None:
                raise UnknownModelError(key, list(self._entries))
            self._entries.move_to_end(key)
            if entry.model is not None and not entry.offloaded:
                self._hits += 1
                return entry.model
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = _Pending()
                # make room first when the size is known from an earlier load
                evicted += self._evict_for(key, entry.nbytes)
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.model is not None
            with self._lock:
                self._hits += 1
            return pending.model
        self._notify_evicted(evicted)
        return self._load(key, entry, pending)

    def release(self, *, offload: bool = False) -> int:
        """Drop every model (``offload=False``) or move accelerator-resident ones to CPU memory; frees
        the accelerator's cached blocks. Returns the bytes that left the accelerator / the cache."""
        gone: list[tuple[ModelKey, str]] = []
        freed = 0
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.model is None or entry.offloaded:
                    continue
                if offload:
                    if torch.device(key.device).type == "cpu":
                        continue
                    entry.model.to("cpu")
                    entry.leave(offload=True)
                    gone.append((key, "offload"))
                else:
                    entry.leave()
                    gone.append((key, "release"))
                freed += entry.nbytes
                self._evictions += 1
        self._notify_evicted(gone)
        return freed

    def make_room(self, keep: nn.Module) -> ModelKey | None:
        """Drop the least recently used model resident on ``keep``'s device, other than ``keep`` (by
        identity), with what is kept for it (its captured graphs), and return the allocator's free blocks
        to the driver; its key, or None when no other model is resident there. For a caller that found the
        device's memory full (a CUDA-graph capture, say) after freeing what it could itself; the model is
        reloaded on its next use, like one evicted for the budget."""
        device = next((_resolved(p.device) for p in keep.parameters()), None)
        with self._lock:
            there = [(k, e) for k, e in self._resident_on(device) if e.model is not keep]
            gone = self._evict_first(there)
        self._notify_evicted(gone)
        return gone[0][0] if gone else None

    def attachment(self, model: nn.Module, name: str, factory: Callable[[], T]) -> T | None:
        """The object called ``name`` kept with ``model`` (a resident model of this cache, by identity),
        made by ``factory()`` on first use; None when ``model`` is not one (e.g. a model given in memory).

        It lives exactly as long as the model stays loaded on its device: eviction, :meth:`release` (offload
        included) and :meth:`clear` drop it, and a reloaded model starts without it. It is not counted in
        the model's bytes. Use it for state derived from the loaded weights (the tasks keep the model's
        ``CapturedModel`` here); callers that still hold it after the model left may finish with it.
        """
        with self._lock:
            entry = self._resident_entry(model)
            if entry is None:
                return None
            if name in entry.attached:
                return entry.attached[name]  # type: ignore[no-any-return]
        made = factory()  # outside the lock: it may be slow or use the cache
        with self._lock:
            entry = self._resident_entry(model)
            if entry is None:
                return made  # the model left meanwhile: the caller's to use, not kept
            return entry.attached.setdefault(name, made)  # type: ignore[no-any-return]

    def attachments(self, model: nn.Module) -> dict[str, Any]:
        """A copy of what is kept with the resident ``model`` (:meth:`attachment`), by name; empty when it
        has nothing or is not a resident model of this cache."""
        with self._lock:
            entry = self._resident_entry(model)
            return dict(entry.attached) if entry is not None else {}

    def resident_attachments(self) -> list[dict[str, Any]]:
        """A copy of what is kept with each resident model (:meth:`attachment`), least recently used first
        (the tasks join the captured networks of every model on a GPU, so that a capture short of memory
        can release the graphs of the others)."""
        with self._lock:
            return [
                dict(e.attached) for e in self._entries.values() if e.model is not None and not e.offloaded
            ]

    def clear(self, reason: str = "close") -> None:
        """Forget every model and loader."""
        with self._lock:
            gone = [(k, reason) for k, e in self._entries.items() if e.model is not None]
            for entry in self._entries.values():
                entry.leave()
            self._entries.clear()
        self._notify_evicted(gone)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                resident_bytes=self._resident_bytes(),
                budget_bytes=self.budget_bytes,
                models=sum(1 for e in self._entries.values() if e.model is not None and not e.offloaded),
            )

    def resident(self) -> list[ModelKey]:
        """Keys of the models on their device, least recently used first."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.model is not None and not e.offloaded]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._entries.get(key)  # type: ignore[call-overload]
            return entry is not None and entry.model is not None and not entry.offloaded

    # -- internals -----------------------------------------------------------------------------------
    def _load(self, key: ModelKey, entry: _Entry, pending: _Pending) -> nn.Module:
        evicted: list[tuple[ModelKey, str]] = []
        try:
            while True:
                try:
                    if entry.offloaded and entry.model is not None:
                        model = entry.model.to(key.device)
                    else:
                        model = entry.loader()
                    break
                except torch.cuda.OutOfMemoryError:
                    if not self._room_for_load(key):
                        raise
            if not isinstance(model, nn.Module):
                raise TypeError(f"the loader for {key} returned {type(model).__name__}, not an nn.Module")
            nbytes = module_nbytes(model)
            with self._lock:
                evicted += self._evict_for(key, nbytes)
                if self.budget_bytes is not None and nbytes > self.budget_bytes:
                    logger.warning(
                        "model %s needs %d bytes, more than the whole memory budget (%d bytes): kept alone",
                        key,
                        nbytes,
                        self.budget_bytes,
                    )
                reloaded_from_cpu = entry.offloaded
                entry.model, entry.nbytes, entry.offloaded, entry.attached = model, nbytes, False, {}
                self._entries[key] = entry
                self._entries.move_to_end(key)
                if reloaded_from_cpu:
                    self._hits += 1
                else:
                    self._misses += 1
                pending.model = model
                del self._loading[key]
        except BaseException as exc:
            with self._lock:
                pending.error = exc
                self._loading.pop(key, None)
            pending.done.set()
            self._notify_evicted(evicted)
            raise
        pending.done.set()
        self._notify_evicted(evicted)
        if not reloaded_from_cpu and self._on_loaded is not None:
            self._on_loaded(key, model)
        return model

    def _room_for_load(self, key: ModelKey) -> bool:
        """Loading ``key`` ran out of device memory: free some on its device and say whether anything was
        freed. First what is kept with the resident models there (their captured graphs, made again when
        next used), then, one per call, the least recently used of those models."""
        gone: list[tuple[ModelKey, str]] = []
        with self._lock:
            there = [(k, e) for k, e in self._resident_on(_resolved(torch.device(key.device))) if k != key]
            held = [e for _, e in there if e.attached]
            for e in held:
                e.attached = {}
            if not held:
                gone = self._evict_first(there)
        if held:
            logger.warning(
                "loading model %s: out of device memory; released the graphs of %d model(s)", key, len(held)
            )
            gc.collect()
            empty_accelerator_cache([key.device])
        elif gone:
            logger.warning("loading model %s: out of device memory; evicted model %s", key, gone[0][0])
            gc.collect()
            self._notify_evicted(gone)
        return bool(held or gone)

    def _resident_on(self, device: torch.device | None) -> list[tuple[ModelKey, _Entry]]:
        """With the lock held: the models resident on ``device`` (None: on any), least recently used
        first."""
        return [
            (k, e)
            for k, e in self._entries.items()
            if e.model is not None
            and not e.offloaded
            and (device is None or _resolved(torch.device(k.device)) == device)
        ]

    def _evict_first(self, candidates: list[tuple[ModelKey, _Entry]]) -> list[tuple[ModelKey, str]]:
        """With the lock held: drop the first of ``candidates`` (for lack of device memory)."""
        if not candidates:
            return []
        key, entry = candidates[0]
        entry.leave()
        self._evictions += 1
        return [(key, "device memory")]

    def _evict_for(self, key: ModelKey, nbytes: int) -> list[tuple[ModelKey, str]]:
        """With the lock held: drop LRU models (other than ``key``) until ``nbytes`` more fit the budget."""
        if self.budget_bytes is None:
            return []
        gone: list[tuple[ModelKey, str]] = []
        for other, entry in list(self._entries.items()):
            if self._resident_bytes() + nbytes <= self.budget_bytes:
                break
            if other == key or entry.model is None or entry.offloaded:
                continue
            entry.leave()
            self._evictions += 1
            gone.append((other, "budget"))
        return gone

    def _resident_entry(self, model: nn.Module) -> _Entry | None:
        """With the lock held: the entry whose resident model is ``model`` (identity)."""
        for entry in self._entries.values():
            if entry.model is model and not entry.offloaded:
                return entry
        return None

    def _resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.model is not None and not e.offloaded)

    def _notify_evicted(self, gone: list[tuple[ModelKey, str]]) -> None:
        """Tell the listener (so plugins drop their references), then return freed blocks to the driver."""
        if not gone:
            return
        if self._on_evicted is not None:
            for key, reason in gone:
                self._on_evicted(key, reason)
        empty_accelerator_cache([k.device for k, _ in gone])


def _resolved(device: torch.device) -> torch.device:
    """``device`` with the index a bare ``cuda`` means (the current device), so that keys and parameters
    compare."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def empty_accelerator_cache(devices: list[str]) -> None:
    """Return cached allocator blocks to the driver for the accelerator types among ``devices``."""
    types = {torch.device(d).type for d in devices}
    if "cuda" in types and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if "mps" in types and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


# -- key helpers ---------------------------------------------------------------------------------------


def content_hash(path: str | os.PathLike[str], memo: MutableMapping[Stamp, str] | None = None) -> str:
    """sha256 of a checkpoint file, or of a folder (every file's relative path and content, sorted).

    ``memo`` (a file's :func:`~ldm_sdk.file_hashes.file_stamp` -> digest; the runtime's is a
    :class:`~ldm_sdk.file_hashes.FileHashMemo`, kept on disk) avoids re-reading an unchanged multi-GB file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        digest = hashlib.sha256()
        for child in sorted(c for c in p.rglob("*") if c.is_file()):
            digest.update(child.relative_to(p).as_posix().encode() + b"\0")
            digest.update(content_hash(child, memo).encode())
        return digest.hexdigest()
    stamp = file_stamp(p)
    if memo is not None and stamp in memo:
        return memo[stamp]
    from ldm_sdk.checkpoints.safe_load import file_sha256

    out = file_sha256(p)
    if memo is not None:
        memo[stamp] = out
    return out


def config_identity(config: Any, memo: MutableMapping[Stamp, str] | None = None) -> str:
    """A stable string for the ``config`` argument of a load: a file's hash, a pydantic model's or a
    mapping's canonical JSON hash, or ``""`` for ``None`` (detected from the checkpoint)."""
    if config is None:
        return ""
    if isinstance(config, str | os.PathLike):
        return content_hash(config, memo)
    if hasattr(config, "model_dump_json"):
        text = config.model_dump_json()
    elif isinstance(config, Mapping):
        text = json.dumps(config, sort_keys=True, default=str)
    else:
        raise TypeError(
            f"config must be a path, a mapping, a pydantic config or None; got {type(config).__name__}"
        )
    return hashlib.sha256(text.encode()).hexdigest()
