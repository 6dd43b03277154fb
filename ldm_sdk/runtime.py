"""The Runtime: the one per-process owner of plugins, registries, device, dtype, model cache and job queue.

``Runtime.create(...)`` builds one explicitly (tests use ``load_entrypoints=False``); ``Runtime.shared()``
is the process-wide instance, created on first use. Everything else takes a runtime as an argument: nothing
happens at import time.

Creating a runtime: register the built-in plugin, any ``plugins=`` objects and the distributions' entry points
of group ``"ldm_sdk"`` (skipping disabled names without importing them); fill every registry by calling each
plugin's registration hooks in that order; choose device and dtype; call ``ldm_runtime_started``.

Environment switches (read by ``create``):

- ``LDM_SDK_DISABLE_PLUGINS=name1,name2``: never import or register these plugins (``builtin`` included).
- ``LDM_SDK_NO_ENTRYPOINTS=1``: discover no entry-point plugins.
- ``LDM_SDK_TRACE_PLUGINS=1``: log every hook call (plugins called, arguments, time, errors) to the
  ``ldm_sdk.plugins`` logger at DEBUG level.
- ``LDM_SDK_DEVICE`` / ``LDM_SDK_DTYPE``: see :mod:`ldm_sdk.devices`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import torch
from torch import nn

from ldm_sdk.cache_dir import cache_root
from ldm_sdk.devices import dtype_name, parse_dtype, select_device, select_dtype
from ldm_sdk.encoders.prompt_cache import DEFAULT_CAPACITY as DEFAULT_PROMPT_CACHE
from ldm_sdk.encoders.prompt_cache import PromptCache
from ldm_sdk.file_hashes import FileHashMemo
from ldm_sdk.jobs import Job, JobContext, JobEvent, JobQueue
from ldm_sdk.plugin_host import DISABLE_ENV, PluginHost, PluginInfo, PluginLoadError
from ldm_sdk.registry import Registries
from ldm_sdk.runtime_cache import (
    CacheStats,
    Loader,
    ModelCache,
    ModelKey,
    config_identity,
    content_hash,
    empty_accelerator_cache,
)

TRACE_ENV = "LDM_SDK_TRACE_PLUGINS"
NO_ENTRYPOINTS_ENV = "LDM_SDK_NO_ENTRYPOINTS"
#: ``0`` turns the fused GroupNorm+SiLU / GEGLU kernels off for models the runtime loads
FUSED_KERNELS_ENV = "LDM_SDK_FUSED_KERNELS"
#: ``0`` turns the CPU fast path off for bf16 models the runtime loads on the CPU
CPU_FAST_PATH_ENV = "LDM_SDK_CPU_FAST_PATH"
#: how many encoded prompts the runtime keeps (``Runtime(prompt_cache_size=)``; ``0``: none)
PROMPT_CACHE_ENV = "LDM_SDK_PROMPT_CACHE"
#: how tasks run the denoising network (``Runtime(capture_mode=...)``)
TASK_CAPTURE_MODES: tuple[str, ...] = ("auto", "off", "emulate")

__all__ = ["PluginInfo", "PluginLoadError", "Runtime"]

logger = logging.getLogger("ldm_sdk.runtime")
R = TypeVar("R")


class _SharedHolder:
    """Runtime.shared()'s instance: the module's only state."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.runtime: Runtime | None = None
        self.creating = False


_SHARED = _SharedHolder()


class Runtime:
    """Owner of the plugin manager, registries, device/dtype policy, model cache and job queue.

    Build it with :meth:`create` (or get the process-wide one with :meth:`shared`); close it with
    :meth:`close` or a ``with`` block.
    """

    def __init__(
        self,
        *,
        load_entrypoints: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        memory_budget_bytes: int | None = None,
        disabled_plugins: Iterable[str] = (),
        trace: bool = False,
        plugins: Sequence[object] = (),
        capture_mode: str = "auto",
        fused_kernels: bool | None = None,
        cpu_fast_path: bool | None = None,
        prompt_cache_size: int | None = None,
    ) -> None:
        """The options of :meth:`create`. ``plugins`` are extra plugin objects registered after the built-in
        one and before entry points (scripts and tests); ``disabled_plugins`` adds to
        ``$LDM_SDK_DISABLE_PLUGINS``.

        ``capture_mode``: the fast path of tasks whose request has ``accelerate=True`` (the default):
        ``"auto"`` replays the denoising network from CUDA graphs for models on a CUDA device (one
        :class:`~ldm_sdk.accel.graphs.CapturedModel` per loaded model, kept in the model cache) and changes
        nothing elsewhere; ``"off"`` always runs it eagerly; ``"emulate"`` runs the capture logic (static
        buffers, signature cache) on any device, replaying by an eager call, for tests.

        ``fused_kernels``: models loaded on CUDA in fp16 / bf16 run GroupNorm (+ the SiLU after it) and GEGLU
        as fused Triton kernels that compute in float32 and round once, with channels_last weights
        (:func:`ldm_sdk.accel.prepare.prepare_cuda_inference`; eager and CUDA-graph runs alike); float32
        and CPU models are never changed. ``None``: on unless ``$LDM_SDK_FUSED_KERNELS`` is ``0``.

        ``cpu_fast_path``: models loaded on the CPU get the cross-attention K/V cache, which is exact (the
        same bits); those loaded in bf16 (``dtype="bf16"``, or ``$LDM_SDK_DTYPE``; fp32 stays the CPU
        default) also get channels_last weights (:func:`ldm_sdk.accel.cpu.configure_cpu_inference` on the
        UNet and the first stage, leaving torch's thread count alone): 1.2x the bf16 eager tasks on an AMX
        CPU, and 1.07x for fp32 at the CI size, where the context projections are a large part of the
        small UNet (``docs/performance-log.md``). bf16 models also get prepacked weights (the same bits,
        about 10 % off a step) when that second copy of their convolution and linear weights takes at most
        1/16 of the machine's memory (``PREPACK_MAX_MEMORY_SHARE``); the cache's budget does not count it.
        CUDA models are never changed by it. ``None``: on unless ``$LDM_SDK_CPU_FAST_PATH`` is ``0``.

        ``prompt_cache_size``: how many encoded prompts the tasks keep for reuse (:attr:`prompt_cache`, a
        :class:`~ldm_sdk.encoders.prompt_cache.PromptCache`): a repeated prompt and the negative prompt are
        encoded once while the encoder's weights stay the same; ``0`` encodes every time. ``None``:
        ``$LDM_SDK_PROMPT_CACHE``, else 32."""
        if capture_mode not in TASK_CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {capture_mode!r}; valid: {', '.join(TASK_CAPTURE_MODES)}")
        self.capture_mode = capture_mode
        env = os.environ
        if fused_kernels is None:
            fused_kernels = _env_flag(env, FUSED_KERNELS_ENV, default=True)
        self.fused_kernels = fused_kernels
        if cpu_fast_path is None:
            cpu_fast_path = _env_flag(env, CPU_FAST_PATH_ENV, default=True)
        self.cpu_fast_path = cpu_fast_path
        if prompt_cache_size is None:
            prompt_cache_size = _env_count(env, PROMPT_CACHE_ENV, default=DEFAULT_PROMPT_CACHE)
        self.prompt_cache = PromptCache(prompt_cache_size)
        self._plugins = PluginHost(
            disabled=frozenset(disabled_plugins) | _env_names(env.get(DISABLE_ENV, "")),
            trace=trace or _env_flag(env, TRACE_ENV),
        )
        self.plugin_manager: pluggy.PluginManager = self._plugins.pm
        self.registries: Registries = self._plugins.registries
        self.disabled_plugins = self._plugins.disabled
        self.device = select_device(device)
        self.dtype = select_dtype(self.device, dtype)
        self.cache = ModelCache(
            memory_budget_bytes, on_loaded=self._model_loaded, on_evicted=self._model_evicted
        )
        self._jobs = JobQueue(self._emit, runtime=self)
        self._subscribers: list[Callable[[JobEvent], None]] = []
        # checkpoint digests, remembered across processes (a new process skips re-hashing multi-GB files)
        self._hash_memo = FileHashMemo(cache_root() / "file-hashes")
        self._lock = threading.RLock()
        self._closed = False
        self._plugins.load(
            objects=plugins, entrypoints=load_entrypoints and not _env_flag(env, NO_ENTRYPOINTS_ENV)
        )
        logger.info(
            "runtime on %s (%s), plugins: %s", self.device, dtype_name(self.dtype), self._plugins.names()
        )
        self._plugins.call_event("ldm_runtime_started", runtime=self)

    @classmethod
    def create(cls, **options: Any) -> Runtime:
        """A new runtime; ``options`` are the keyword arguments of :class:`Runtime` (``load_entrypoints``,
        ``device``, ``dtype``, ``memory_budget_bytes``, ``disabled_plugins``, ``trace``, ``plugins``,
        ``capture_mode``, ``fused_kernels``, ``cpu_fast_path``, ``prompt_cache_size``)."""
        return cls(**options)

    @classmethod
    def shared(cls) -> Runtime:
        """The process-wide runtime (``Runtime.create()`` with defaults and the environment), created on the
        first call from any thread; after it is closed, the next call creates a new one."""
        with _SHARED.lock:
            if _SHARED.creating:
                raise RuntimeError(
                    "Runtime.shared() was called while the shared runtime is being created (from a plugin "
                    "hook?); use the runtime the hook receives"
                )
            if _SHARED.runtime is None or _SHARED.runtime.closed:
                _SHARED.creating = True
                try:
                    _SHARED.runtime = cls.create()
                finally:
                    _SHARED.creating = False
            return _SHARED.runtime

    # -- plugins -------------------------------------------------------------------------------------
    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object now: its registration hooks fill the registries, then it receives
        ``ldm_runtime_started``. Returns its name (default: the module's or class's qualified name).
        A disabled name raises ``ValueError``; a name clash or invalid hook, ``PluginLoadError``."""
        with self._lock:
            self._check_open()
            name = self._plugins.register(plugin, name)
            self._plugins.call_event("ldm_runtime_started", only=name, runtime=self)
            return name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        with self._lock:
            self._plugins.unregister(name)

    def plugins(self) -> list[PluginInfo]:
        """Registered plugins in order, then disabled ones, with what each registered, per registry."""
        with self._lock:
            return self._plugins.plugins()

    # -- models --------------------------------------------------------------------------------------
    def model_key(
        self,
        path: str | os.PathLike[str],
        config: Any = None,
        *,
        use_ema: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ModelKey:
        """The cache key of a checkpoint loaded with these options (hashes the file once per change)."""
        dev = self.device if device is None else select_device(device)
        dt = self.dtype if dtype is None and dev == self.device else select_dtype(dev, dtype)
        return ModelKey(
            content=content_hash(path, self._hash_memo),
            config=config_identity(config, self._hash_memo),
            dtype=dtype_name(dt),
            device=str(dev),
            variant="ema" if use_ema else "",
        )

    def load_model(
        self,
        path: str | os.PathLike[str],
        config: Any = None,
        *,
        use_ema: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> nn.Module:
        """The checkpoint at ``path`` as a ``ModelBundle``: from the cache, or loaded (on this runtime's
        device and dtype unless given) by the registered format that recognises it
        (:meth:`checkpoint_format`)."""
        fmt = self.registries.checkpoint_formats.get(self.checkpoint_format(path))
        key = self.model_key(path, config, use_ema=use_ema, device=device, dtype=dtype)

        def load() -> nn.Module:
            target, precision = torch.device(key.device), parse_dtype(key.dtype)
            model = fmt.load(Path(path), config, device=target, dtype=precision, use_ema=use_ema)
            if self.fused_kernels and target.type == "cuda":
                from ldm_sdk.accel.prepare import prepare_cuda_inference

                prepare_cuda_inference(model)
            elif self.cpu_fast_path and target.type == "cpu" and precision in (torch.bfloat16, torch.float32):
                _cpu_fast_path(model, precision)
            return model

        return self.get_model(key, load)

    def checkpoint_format(self, path: str | os.PathLike[str]) -> str:
        """The name of the first registered checkpoint format whose ``detect`` recognises ``path``."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        formats = self.registries.checkpoint_formats
        for name in formats:
            if formats.get(name).detect(p):
                return name
        known = ", ".join(f"{n} ({' '.join(formats.get(n).suffixes) or 'folder'})" for n in formats)
        raise ValueError(
            f"no registered checkpoint format recognises {p}; registered formats: {known or 'none'}"
        )

    def get_model(self, key: ModelKey, loader: Loader | None = None) -> nn.Module:
        """The cached model for ``key``, loading it with ``loader`` (or the remembered one) on a miss."""
        self._check_open()
        return self.cache.get(key, loader)

    def release(self, *, offload: bool = False) -> int:
        """Give memory back (to a host's renderer): drop every cached model, or with ``offload=True`` move
        them to CPU memory until next used, with what the cache keeps for them (their captured CUDA graphs);
        drops the encoded prompts; empties the CUDA/MPS allocator cache. Returns the models' bytes freed."""
        freed = self.cache.release(offload=offload)
        self.prompt_cache.clear()
        empty_accelerator_cache([str(self.device)])  # also the blocks jobs' activations left cached
        return freed

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    # -- jobs ----------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[JobContext], R], *, priority: int = 0, name: str | None = None) -> Job[R]:
        """Queue ``fn(ctx)`` on the runtime's single worker (higher ``priority`` first, FIFO within one)."""
        return self._jobs.submit(fn, priority=priority, name=name)

    def subscribe(self, listener: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for every job event (before the ``ldm_job_event`` hook); returns an
        unsubscribe function. Listeners run in the thread the event happens in and must return quickly."""
        with self._lock:
            self._subscribers.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._subscribers:
                    self._subscribers.remove(listener)

        return unsubscribe

    def pending_jobs(self) -> list[Job[Any]]:
        return self._jobs.pending()

    # -- lifetime ------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Stop the job worker (cancelling queued and running jobs unless ``cancel_pending=False``), call
        ``ldm_runtime_closing``, empty the model cache. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.close(cancel_pending=cancel_pending, timeout=timeout)
        self._plugins.call_event("ldm_runtime_closing", runtime=self)
        self.cache.clear("close")
        self.prompt_cache.clear()
        self._plugins.close()
        with _SHARED.lock:
            if _SHARED.runtime is self:
                _SHARED.runtime = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Runtime({self.device}, {dtype_name(self.dtype)}, plugins={self._plugins.names()}, {state})"

    # -- internals -----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this runtime is closed; create a new one (Runtime.create or Runtime.shared)")

    def _emit(self, event: JobEvent) -> None:
        with self._lock:
            listeners = list(self._subscribers)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("job event listener %r failed on %s", listener, type(event).__name__)
        self._plugins.call_event("ldm_job_event", event=event)

    def _model_loaded(self, key: ModelKey, model: nn.Module) -> None:
        self._plugins.call_event("ldm_model_loaded", runtime=self, key=key, model=model)

    def _model_evicted(self, key: ModelKey, reason: str) -> None:
        self._plugins.call_event("ldm_model_evicted", runtime=self, key=key, reason=reason)


# -- helpers -------------------------------------------------------------------------------------------


def _cpu_fast_path(model: nn.Module, dtype: torch.dtype) -> None:
    """The K/V cache for a CPU bundle's UNet, and for bf16 also channels_last weights in the UNet and the
    first stage (see ``Runtime(cpu_fast_path=)``); other models are left as they are."""
    from ldm_sdk.checkpoints.bundle import ModelBundle

    if not isinstance(model, ModelBundle):
        return
    from ldm_sdk.accel.cpu import configure_cpu_inference

    networks = [m for m in (model.model, model.first_stage_model) if m is not None]
    if not networks:
        return
    if dtype == torch.bfloat16:
        configure_cpu_inference(*networks, dtype=dtype, threads=0, prepack=_prepack_fits(networks))
    elif model.model is not None:  # fp32: only what keeps the bits (channels_last would change them)
        from ldm_sdk.accel.kv_cache import cache_context_projections
        from ldm_sdk.models.attention import CrossAttention

        if any(isinstance(m, CrossAttention) for m in model.model.modules()):
            cache_context_projections(model.model)


#: bf16 CPU models get prepacked weights when the second copy takes at most this share of physical memory
PREPACK_MAX_MEMORY_SHARE = 1 / 16


def _prepack_fits(networks: list[nn.Module]) -> bool:
    """Whether a bf16 CPU model's weights are prepacked (:mod:`ldm_sdk.accel.cpu_prepack`: the same bits,
    about 10 % off a step, a second copy of the convolution and linear weights): where this torch build can,
    and the copy takes at most :data:`PREPACK_MAX_MEMORY_SHARE` of the machine's physical memory (small
    models; SD-1.5's UNet and autoencoder, about 1.9 GB, only on a machine of about 30 GB or more)."""
    from ldm_sdk.accel.cpu_prepack import packable_bytes, physical_memory_bytes, prepack_available

    memory = physical_memory_bytes()
    if memory is None or not prepack_available():
        return False
    return packable_bytes(*networks) <= memory * PREPACK_MAX_MEMORY_SHARE


def _env_names(value: str) -> frozenset[str]:
    return frozenset(n.strip() for n in value.split(",") if n.strip())


def _env_flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """``$name`` as a switch: ``0`` / ``false`` / ``no`` / ``off`` are off, other values on, unset or empty
    ``default``."""
    value = env.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def _env_count(env: Mapping[str, str], name: str, *, default: int) -> int:
    """``$name`` as a count >= 0; unset or empty: ``default``; anything else is an error naming it."""
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"${name} must be a whole number >= 0 (0: off); got {value!r}")
    return count
