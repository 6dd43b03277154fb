"""The runtime's plugin side: the pluggy PluginManager, discovery, the registries and hook calls.

:class:`PluginHost` is owned by a :class:`~ldm_sdk.runtime.Runtime` (``runtime.plugin_manager`` and
``runtime.registries`` are its). Registration order: the built-in plugin, plugin objects passed in, then
entry points of group ``"ldm_sdk"``; disabled names are never imported. Registration hooks are called per
plugin (pluggy's ``subset_hook_caller``), so every registry entry is attributed to the plugin that made it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from ldm_sdk import hookspecs
from ldm_sdk.registry import Registries

ENTRYPOINT_GROUP = "ldm_sdk"
DISABLE_ENV = "LDM_SDK_DISABLE_PLUGINS"
BUILTIN = "builtin"

logger = logging.getLogger("ldm_sdk.runtime")
trace_logger = logging.getLogger("ldm_sdk.plugins")


class PluginLoadError(RuntimeError):
    """A plugin could not be imported, registered or validated; the message says how to disable it."""


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``ldm-sdk plugins`` lists it. ``registered`` maps a registry kind (``"samplers"``
    ...) to the names this plugin added there; a disabled plugin has ``enabled=False``, nothing registered."""

    name: str
    version: str
    distribution: str
    source: str  # "builtin" | "entrypoint" | "runtime"
    enabled: bool = True
    registered: dict[str, tuple[str, ...]] = field(default_factory=dict)


class PluginHost:
    """Plugin manager + registries + discovery. Not thread-safe by itself: the runtime serialises calls."""

    def __init__(self, *, disabled: Iterable[str] = (), trace: bool = False) -> None:
        self.disabled = frozenset(disabled)
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for name in self.disabled:
            self.pm.set_blocked(name)
        self.registries = Registries.empty()
        self._meta: dict[str, PluginInfo] = {}
        self._skipped: list[PluginInfo] = []
        self._undo_trace = _install_tracing(self.pm) if trace else None

    # -- loading -------------------------------------------------------------------------------------
    def load(self, *, objects: Sequence[object] = (), entrypoints: bool = True) -> None:
        """Register the built-in plugin, ``objects`` and (if asked) entry points; fill every registry."""
        from ldm_sdk import __version__, plugins_builtin

        builtin = PluginInfo(BUILTIN, __version__, "ldm-sdk", "builtin")
        if BUILTIN in self.disabled:
            self._skipped.append(replace(builtin, enabled=False))
        else:
            self._add(plugins_builtin, builtin)
        for plugin in objects:
            info = PluginInfo(plugin_name(plugin), _version(plugin), "", "runtime")
            if info.name in self.disabled:
                self._skipped.append(replace(info, enabled=False))
            else:
                self._add(plugin, info)
        if entrypoints:
            self._load_entrypoints()
        self._check_hooks()
        for name in self.names():
            self._fill_registries(name)

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register one plugin after loading and fill the registries from it; rolled back on error."""
        name = name or plugin_name(plugin)
        if self.pm.is_blocked(name):
            raise ValueError(f"plugin {name!r} is disabled (disabled_plugins / ${DISABLE_ENV})")
        self._add(plugin, PluginInfo(name, _version(plugin), "", "runtime"))
        try:
            self._check_hooks()
            self._fill_registries(name)
        except BaseException:
            self.unregister(name)
            raise
        return name

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        if self.pm.get_plugin(name) is None:
            raise KeyError(f"no plugin named {name!r}; registered: {', '.join(self.names()) or 'none'}")
        self.pm.unregister(name=name)
        self._meta.pop(name, None)
        for _, registry in self.registries.items():
            registry.remove_plugin(name)

    def names(self) -> list[str]:
        """Registered plugin names, in registration order."""
        return [n for n, p in self.pm.list_name_plugin() if p is not None]

    def plugins(self) -> list[PluginInfo]:
        """Registered plugins in order, then disabled ones, with what each registered, per registry."""
        out = []
        for name in self.names():
            registered = {
                kind: tuple(names) for kind, reg in self.registries.items() if (names := reg.by_plugin(name))
            }
            out.append(replace(self._meta[name], registered=registered))
        return out + list(self._skipped)

    # -- calling -------------------------------------------------------------------------------------
    def call_event(self, hook_name: str, *, only: str | None = None, **kwargs: Any) -> None:
        """Call an event hook (on plugin ``only``, or all); a plugin's exception is logged, never raised."""
        hook = getattr(self.pm.hook, hook_name)
        if only is not None:
            hook = self.pm.subset_hook_caller(hook_name, self._others(only))
        try:
            hook(**kwargs)
        except Exception:
            logger.exception("a plugin's %s implementation failed", hook_name)

    def close(self) -> None:
        if self._undo_trace is not None:
            self._undo_trace()
            self._undo_trace = None

    # -- internals -----------------------------------------------------------------------------------
    def _others(self, name: str) -> list[object]:
        keep = self.pm.get_plugin(name)
        return [p for n, p in self.pm.list_name_plugin() if p is not None and p is not keep]

    def _add(self, plugin: object, info: PluginInfo) -> None:
        name = info.name
        if self.pm.has_plugin(name) or name in self._meta:
            earlier = self._meta.get(name)
            first = earlier.distribution if earlier and earlier.distribution else "registered earlier"
            raise PluginLoadError(
                f"two plugins are named {name!r} ({first} and {info.distribution or 'this one'}); "
                f"uninstall or disable one (${DISABLE_ENV}={name}), or register under another name"
            )
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(
                f"plugin {name!r} has an invalid hook implementation: {exc}; fix it or disable it "
                f"(${DISABLE_ENV}={name})"
            ) from exc
        self._meta[name] = info

    def _load_entrypoints(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRYPOINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else ""
            version = dist.version if dist is not None else ""
            if ep.name in self.disabled:
                self._skipped.append(PluginInfo(ep.name, version, dist_name, "entrypoint", enabled=False))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {ep.name!r} ({ep.value}, distribution {dist_name or 'unknown'}) failed to "
                    f"import: {type(exc).__name__}: {exc}; disable it with {DISABLE_ENV}={ep.name}"
                ) from exc
            self._add(plugin, PluginInfo(ep.name, version or _version(plugin), dist_name, "entrypoint"))

    def _check_hooks(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            valid = sorted(n for n in vars(hookspecs) if n.startswith("ldm_"))
            raise PluginLoadError(f"{exc}; valid hooks: {', '.join(valid)}") from exc

    def _fill_registries(self, name: str) -> None:
        """Call ``name``'s registration hooks (only its own implementations) with each registry."""
        plugin = self.pm.get_plugin(name)
        for kind, registry in self.registries.items():
            hook_name = f"ldm_register_{kind}"
            if not any(impl.plugin is plugin for impl in getattr(self.pm.hook, hook_name).get_hookimpls()):
                continue
            with registry.attributing(name):
                self.pm.subset_hook_caller(hook_name, self._others(name))(registry=registry)


def plugin_name(plugin: object) -> str:
    """A module's ``__name__``; for other objects their class's qualified name."""
    name = getattr(plugin, "__name__", None)
    if isinstance(name, str) and name:
        return name
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _version(plugin: object) -> str:
    version = getattr(plugin, "__version__", "")
    return version if isinstance(version, str) else ""


def _install_tracing(pm: pluggy.PluginManager) -> Callable[[], None]:
    """Log each hook call through pluggy's call monitoring: implementations called, arguments, duration."""
    local = threading.local()

    def before(hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, object]) -> None:
        local.__dict__.setdefault("starts", []).append(time.perf_counter())
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        trace_logger.debug("%s(%s) -> %s", hook_name, args, [i.plugin_name for i in impls] or "no plugin")

    def after(outcome: Any, hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, object]) -> None:
        elapsed = (time.perf_counter() - local.starts.pop()) * 1e3
        if outcome.exception is not None:
            trace_logger.debug("%s raised %r after %.2f ms", hook_name, outcome.exception, elapsed)
        else:
            trace_logger.debug("%s done in %.2f ms", hook_name, elapsed)

    return pm.add_hookcall_monitoring(before, after)


def _short(value: object) -> str:
    """A log-sized repr: big objects (modules, runtimes) by type name only."""
    if type(value).__name__ == "Runtime" or hasattr(value, "state_dict"):
        return f"<{type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
