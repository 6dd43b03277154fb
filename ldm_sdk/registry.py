"""Named registries that plugins fill: one :class:`Registry` per kind, owned by the runtime.

A registration hook (``ldm_register_samplers(registry)`` ...) receives the runtime's registry of that kind and
calls :meth:`Registry.add`. Lookups that miss raise :class:`UnknownNameError` (a ``KeyError``) whose message
lists every known name; registering a name twice raises :class:`DuplicateNameError` naming both plugins.
"""

from __future__ import annotations

import difflib
import inspect
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.families import Family
    from ldm_sdk.hookspecs import CheckpointFormat, Sampler, ScheduleFn

T = TypeVar("T")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*")
UNATTRIBUTED = "<unattributed>"


class UnknownNameError(KeyError):
    """A registry lookup missed; the message lists the names that are registered."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        if not self.known:
            return (
                f"unknown {self.kind} {self.name!r}: no {self.kind} is registered (is its plugin disabled?)"
            )
        close = difflib.get_close_matches(self.name, self.known, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        return f"unknown {self.kind} {self.name!r}{hint}; known: {', '.join(self.known)}"


class DuplicateNameError(ValueError):
    """Two plugins registered the same name in one registry."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registration: the factory (or function, or record) under ``name``, and who registered it."""

    name: str
    factory: T
    plugin: str
    description: str


class Registry(Generic[T]):
    """Name -> factory for one kind of thing (samplers, schedules, checkpoint formats ...).

    ``kind`` is the singular noun used in messages ("sampler"). Iteration yields names in sorted order.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._lock = threading.RLock()
        self._attributing: str | None = None

    # -- registering ---------------------------------------------------------------------------------
    def add(
        self,
        name: str,
        factory: T,
        *,
        plugin: str | None = None,
        description: str | None = None,
        replace: bool = False,
    ) -> T:
        """Register ``factory`` under ``name`` and return it (so ``add`` works as a decorator's body).

        ``plugin`` defaults to the plugin whose registration hook is running. ``description`` defaults to
        the first line of the factory's docstring. A name already registered raises
        :class:`DuplicateNameError` unless ``replace=True`` (an explicit override).
        """
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"invalid {self.kind} name {name!r}: use letters, digits and '_', '.', '+', '-' "
                "(starting with a letter or digit)"
            )
        if factory is None:
            raise ValueError(f"{self.kind} {name!r}: the factory is None")
        owner = plugin or self._attributing or UNATTRIBUTED
        text = description if description is not None else _first_doc_line(factory)
        with self._lock:
            old = self._entries.get(name)
            if old is not None and not replace:
                raise DuplicateNameError(
                    f"{self.kind} {name!r} is registered twice: by plugin {old.plugin!r} and by plugin "
                    f"{owner!r}; disable one of them (LDM_SDK_DISABLE_PLUGINS=<name>) or register under "
                    "another name, or pass replace=True to override on purpose"
                )
            self._entries[name] = Entry(name, factory, owner, text)
        return factory

    def remove_plugin(self, plugin: str) -> list[str]:
        """Drop every entry registered by ``plugin``; returns the names removed."""
        with self._lock:
            gone = [n for n, e in self._entries.items() if e.plugin == plugin]
            for n in gone:
                del self._entries[n]
        return gone

    @contextmanager
    def attributing(self, plugin: str) -> Iterator[None]:
        """While active, :meth:`add` without ``plugin=`` records ``plugin`` as the owner.

        The runtime wraps each plugin's registration hook in this; it serialises registration itself.
        """
        previous, self._attributing = self._attributing, plugin
        try:
            yield
        finally:
            self._attributing = previous

    # -- looking up ----------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The factory registered under ``name``; :class:`UnknownNameError` lists the known names."""
        return self.entry(name).factory

    def entry(self, name: str) -> Entry[T]:
        with self._lock:
            found = self._entries.get(name)
            if found is None:
                raise UnknownNameError(self.kind, name, sorted(self._entries))
            return found

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def by_plugin(self, plugin: str) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._entries.items() if e.plugin == plugin)

    def describe(self) -> list[dict[str, str]]:
        """``[{"name", "plugin", "description"}, ...]`` sorted by name: for listings and JSON output."""
        return [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in self.entries()]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@dataclass(frozen=True)
class Registries:
    """The runtime's registries, one per registration hook (field ``x`` is filled by ``ldm_register_x``)."""

    samplers: Registry[Sampler]
    schedules: Registry[ScheduleFn]
    checkpoint_formats: Registry[CheckpointFormat]
    model_families: Registry[Family]
    condition_encoders: Registry[Any]
    tasks: Registry[Any]
    host_adapters: Registry[Any]

    @classmethod
    def empty(cls) -> Registries:
        return cls(
            samplers=Registry("sampler"),
            schedules=Registry("schedule"),
            checkpoint_formats=Registry("checkpoint format"),
            model_families=Registry("model family"),
            condition_encoders=Registry("condition encoder"),
            tasks=Registry("task"),
            host_adapters=Registry("host adapter"),
        )

    @staticmethod
    def kinds() -> list[str]:
        """Field names, in hook-call order: ``ldm_register_<kind>`` fills ``<kind>``."""
        return [f.name for f in fields(Registries)]

    def by_kind(self, kind: str) -> Registry[Any]:
        if kind not in self.kinds():
            raise UnknownNameError("registry", kind, self.kinds())
        registry: Registry[Any] = getattr(self, kind)
        return registry

    def items(self) -> list[tuple[str, Registry[Any]]]:
        return [(k, getattr(self, k)) for k in self.kinds()]


def _first_doc_line(obj: object) -> str:
    """A registered object's own ``description`` attribute, else its function's or class's docstring line."""
    own = getattr(obj, "description", None)
    if isinstance(own, str) and own:
        return own
    target = getattr(obj, "func", obj)  # functools.partial describes itself by its function
    if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
        return ""
    doc = inspect.getdoc(target) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""
