"""Every plugin hook of ldm-sdk (pluggy project ``"ldm_sdk"``, entry-point group ``"ldm_sdk"``).

A plugin is any object (usually a module) with functions decorated by :data:`hookimpl` and named like the
specs below; implement only the hooks you need, with any subset of their arguments. A distribution makes
itself discoverable with::

    [project.entry-points.ldm_sdk]
    my_plugin = "my_package.plugin"

Registration hooks receive the runtime's :class:`~ldm_sdk.registry.Registry` of one kind and call
``registry.add(name, factory)``; they are called once per plugin, in plugin registration order (built-ins
first), and registering a name another plugin already registered is an error. Event hooks are called by the
:class:`~ldm_sdk.runtime.Runtime` as things happen; they must return quickly and must not raise (an
exception is logged and otherwise ignored, so one broken tracer cannot stop a render).

``docs/plugins.md`` documents each hook with its exact signature; ``tests/test_hookspecs.py`` checks that the
two agree and that the runtime calls every hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor, nn

    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.families import Family
    from ldm_sdk.jobs import JobEvent
    from ldm_sdk.registry import Registry
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.runtime_cache import ModelKey

PROJECT = "ldm_sdk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: ``sample(denoiser, x, timesteps, *, callback=None, generator=None, **options) -> Tensor``
Sampler = Callable[..., "Tensor"]
#: ``betas(n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3) -> float64 ndarray``
ScheduleFn = Callable[..., "np.ndarray"]


@dataclass(frozen=True)
class CheckpointFormat:
    """How to recognise and load one kind of checkpoint (a file format, or a folder layout).

    ``detect(path) -> bool`` answers cheaply from content (magic bytes, marker files), never from the
    suffix alone. ``load(path, config=None, *, device=None, dtype=None, use_ema=False) -> ModelBundle`` reads
    it safely (refusing anything that would run code) into a ``ModelBundle`` with CompVis names, exactly like
    :func:`ldm_sdk.checkpoints.loader.load`. ``suffixes`` are the usual name endings (empty for a folder
    layout), for file dialogs and listings. Neither function may import heavy modules before it is called.
    """

    suffixes: tuple[str, ...]
    detect: Callable[[Path], bool]
    load: Callable[..., ModelBundle]
    description: str = ""


# -- registration ------------------------------------------------------------------------------------


@hookspec
def ldm_register_samplers(registry: Registry[Sampler]) -> None:
    """Register sampling algorithms.

    Called once per plugin while the runtime is created (or when the plugin is registered later with
    ``Runtime.register_plugin``), before ``ldm_runtime_started``.
    Do: ``registry.add("name", sample_fn)`` for each sampler, where ``sample_fn(denoiser, x, timesteps, *,
    callback=None, generator=None, **options) -> Tensor`` calls ``callback(StepInfo)`` after every step and
    lets ``SamplingCancelled`` raised by the callback propagate. Import heavy modules inside this hook.
    """


@hookspec
def ldm_register_schedules(registry: Registry[ScheduleFn]) -> None:
    """Register beta (noise) schedules.

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add("name", betas_fn)`` where ``betas_fn(n_timestep, linear_start=1e-4,
    linear_end=2e-2, cosine_s=8e-3)`` returns the float64 betas, each in (0, 1).
    """


@hookspec
def ldm_register_checkpoint_formats(registry: Registry[CheckpointFormat]) -> None:
    """Register checkpoint formats, one per file kind (``safetensors``, ``ckpt``, ``diffusers`` ...).

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add("kind", CheckpointFormat(suffixes, detect, load))``; ``Runtime.load_model`` uses the
    first format whose ``detect(path)`` is true. ``detect`` and ``load`` import what they need when called.
    """


@hookspec
def ldm_register_model_families(registry: Registry[Family]) -> None:
    """Register model families (released models a checkpoint is recognised as: ``sd1``, ``ldm-cin256`` ...).

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add(family.name, family)`` with a ``ldm_sdk.checkpoints.families.Family`` (its original
    YAML as data, the ``ModelConfig`` built from it, file-name hints for detection).
    """


@hookspec
def ldm_register_condition_encoders(registry: Registry[Any]) -> None:
    """Register condition encoders (text, class label, semantic map, low-res image, mask, layout ...).

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add("name", factory)`` where the factory builds the encoder and declares its modality,
    how it conditions (crossattn / concat / adm), its output contract and whether it trains jointly.
    """


@hookspec
def ldm_register_tasks(registry: Registry[Any]) -> None:
    """Register tasks (txt2img, inpaint, upscale ...): a pydantic request type plus one callable each.

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add("name", task)``; the CLI and the server list and run tasks from this registry.
    """


@hookspec
def ldm_register_host_adapters(registry: Registry[Any]) -> None:
    """Register host adapters (Krita, GIMP, Blender ...): pixel conventions and host-primitive mappings.

    Called once per plugin while the runtime is created (or the plugin is registered), before
    ``ldm_runtime_started``.
    Do: ``registry.add("host", adapter)`` where the adapter declares its pixel layout and maps selections,
    shapes and object passes to conditions. Start nothing here: use ``ldm_runtime_started``.
    """


# -- lifecycle ---------------------------------------------------------------------------------------


@hookspec
def ldm_runtime_started(runtime: Runtime) -> None:
    """The runtime is ready: plugins loaded, every registry filled, device and dtype chosen.

    Called once per runtime at the end of ``Runtime.create``, before any job runs; a plugin registered
    later with ``Runtime.register_plugin`` receives it (alone) right after its registration hooks.
    Do: start what the plugin needs for the runtime's life (a host adapter's listener, a tracer's output),
    keeping a reference to ``runtime``; stop it in ``ldm_runtime_closing``.
    """


@hookspec
def ldm_runtime_closing(runtime: Runtime) -> None:
    """The runtime is closing.

    Called once by ``Runtime.close`` after the job queue has stopped (no job is running) and before the
    model cache is emptied.
    Do: stop and join whatever ``ldm_runtime_started`` started; release references to models.
    """


@hookspec
def ldm_model_loaded(runtime: Runtime, key: ModelKey, model: nn.Module) -> None:
    """A model was loaded into the runtime's model cache (a cache miss, or a reload after eviction).

    Called in the thread that asked for the model, after it is in the cache and before it is returned;
    not called on cache hits.
    Do: observe (log, count, warm up); do not move or modify ``model``: other jobs share it.
    """


@hookspec
def ldm_model_evicted(runtime: Runtime, key: ModelKey, reason: str) -> None:
    """A model left the cache, or left the accelerator.

    Called after the cache dropped its reference. ``reason`` is ``"budget"`` (LRU eviction to fit a new
    model under the memory budget), ``"release"`` (``Runtime.release()``), ``"offload"``
    (``Runtime.release(offload=True)`` moved it to CPU memory) or ``"close"``.
    Do: drop your own references to the model so its memory can really be freed.
    """


@hookspec
def ldm_job_event(event: JobEvent) -> None:
    """Something happened to a job: ``JobQueued``, ``JobStarted``, ``JobProgress``, ``JobFinished``,
    ``JobCancelled`` or ``JobFailed`` (``ldm_sdk.jobs``).

    Called synchronously in the thread where it happened (the worker thread for progress, start and end;
    the submitting or cancelling thread for ``JobQueued`` and for cancelling a queued job), in order for
    any one job, after the runtime's own subscribers. ``JobProgress.preview`` is a small uint8 RGB
    preview or ``None``.
    Do: forward or record the event and return at once; never block the worker (queue to your own thread).
    """
