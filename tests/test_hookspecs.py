"""Every hookspec is typed, documented (in its docstring and in docs/plugins.md) and called by the runtime."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from ldm_sdk import hookspecs, jobs
from ldm_sdk.hookspecs import hookimpl
from ldm_sdk.jobs import JobCancelledError, JobContext, JobEvent
from ldm_sdk.runtime import Runtime
from ldm_sdk.runtime_cache import ModelKey

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
WAIT = 10.0


def spec_functions() -> dict[str, Callable[..., Any]]:
    return {n: f for n, f in vars(hookspecs).items() if n.startswith("ldm_") and callable(f)}


def signature(fn: Callable[..., Any]) -> str:
    """``name(arg: Type, ...) -> Return`` exactly as written in hookspecs.py."""
    annotations = dict(fn.__annotations__)
    ret = annotations.pop("return")
    return f"{fn.__name__}({', '.join(f'{k}: {v}' for k, v in annotations.items())}) -> {ret}"


def test_the_plugin_manager_sees_exactly_the_module_hookspecs() -> None:
    with Runtime.create(load_entrypoints=False, disabled_plugins=["builtin"], device="cpu") as runtime:
        specs = {n for n, c in vars(runtime.plugin_manager.hook).items() if getattr(c, "spec", None)}
    assert specs == set(spec_functions())
    assert len(specs) == 12


@pytest.mark.parametrize("name", sorted(spec_functions()))
def test_hookspec_is_typed_and_says_when_it_is_called_and_what_to_do(name: str) -> None:
    fn = spec_functions()[name]
    params = inspect.signature(fn).parameters
    assert set(fn.__annotations__) == {*params, "return"}, f"{name}: every argument and the return are typed"
    assert fn.__annotations__["return"] == "None"
    doc = inspect.getdoc(fn) or ""
    assert "Called" in doc, f"{name}: the docstring must say when the hook is called"
    assert "Do:" in doc, f"{name}: the docstring must say what an implementation should do"


def test_docs_have_one_section_per_hook_with_its_exact_signature() -> None:
    text = DOCS.read_text()
    documented = re.findall(r"^### `(ldm_\w+)`$", text, flags=re.MULTILINE)
    assert sorted(documented) == sorted(spec_functions()), "docs/plugins.md sections != hookspecs"
    assert len(documented) == len(set(documented))
    for name, fn in spec_functions().items():
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert f"```python\ndef {signature(fn)}\n```" in section, f"signature of {name} in docs/plugins.md"


def test_importing_starts_nothing() -> None:
    code = (
        "import threading, sys\n"
        "import ldm_sdk.runtime, ldm_sdk.plugins_builtin, ldm_sdk.preview\n"
        "from ldm_sdk.runtime import _SHARED\n"
        "assert _SHARED.runtime is None, 'a runtime was created at import'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert 'ldm_sdk.checkpoints.families' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- every hook is called by the runtime ---------------------------------------------------------------


class Recorder:
    """Implements every hook and records each call."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.events: list[JobEvent] = []
        self.runtimes: list[Runtime] = []
        self.evictions: list[str] = []

    def _register(self, name: str, registry: Any) -> None:
        self.calls[name] += 1
        registry.add(f"recorded-{registry.kind.replace(' ', '-')}", object(), description="from the recorder")

    @hookimpl
    def ldm_register_samplers(self, registry: Any) -> None:
        self._register("ldm_register_samplers", registry)

    @hookimpl
    def ldm_register_schedules(self, registry: Any) -> None:
        self._register("ldm_register_schedules", registry)

    @hookimpl
    def ldm_register_checkpoint_formats(self, registry: Any) -> None:
        self._register("ldm_register_checkpoint_formats", registry)

    @hookimpl
    def ldm_register_model_families(self, registry: Any) -> None:
        self._register("ldm_register_model_families", registry)

    @hookimpl
    def ldm_register_condition_encoders(self, registry: Any) -> None:
        self._register("ldm_register_condition_encoders", registry)

    @hookimpl
    def ldm_register_tasks(self, registry: Any) -> None:
        self._register("ldm_register_tasks", registry)

    @hookimpl
    def ldm_register_host_adapters(self, registry: Any) -> None:
        self._register("ldm_register_host_adapters", registry)

    @hookimpl
    def ldm_runtime_started(self, runtime: Runtime) -> None:
        self.calls["ldm_runtime_started"] += 1
        self.runtimes.append(runtime)

    @hookimpl
    def ldm_runtime_closing(self, runtime: Runtime) -> None:
        self.calls["ldm_runtime_closing"] += 1
        assert runtime._jobs.running is None  # the queue has stopped

    @hookimpl
    def ldm_model_loaded(self, runtime: Runtime, key: ModelKey, model: nn.Module) -> None:
        self.calls["ldm_model_loaded"] += 1

    @hookimpl
    def ldm_model_evicted(self, runtime: Runtime, key: ModelKey, reason: str) -> None:
        self.calls["ldm_model_evicted"] += 1
        self.evictions.append(reason)

    @hookimpl
    def ldm_job_event(self, event: JobEvent) -> None:
        self.calls["ldm_job_event"] += 1
        self.events.append(event)


def test_the_recorder_implements_every_hook() -> None:
    implemented = {n for n, _ in inspect.getmembers(Recorder) if n.startswith("ldm_")}
    assert implemented == set(spec_functions())


def test_the_runtime_calls_every_hook() -> None:
    recorder = Recorder()
    runtime = Runtime.create(
        load_entrypoints=False, disabled_plugins=["builtin"], device="cpu", plugins=[recorder]
    )
    assert recorder.runtimes == [runtime]
    for kind, registry in runtime.registries.items():
        assert registry.entry(registry.names()[0]).plugin == runtime.plugins()[0].name, kind

    key = ModelKey("k" * 64)
    runtime.get_model(key, lambda: nn.Linear(2, 2))
    runtime.get_model(key)  # a hit: no second ldm_model_loaded
    runtime.release()

    def steps(ctx: JobContext) -> str:
        for i in range(3):
            ctx.progress(i + 1, 3)
        return "done"

    gate, started = threading.Event(), threading.Event()
    assert runtime.submit(steps).result(WAIT) == "done"
    failing = runtime.submit(lambda ctx: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(WAIT)
    blocker = runtime.submit(lambda ctx: [started.set(), gate.wait(WAIT), ctx.check_cancelled()])
    assert started.wait(WAIT)
    blocker.cancel()
    gate.set()
    with pytest.raises(JobCancelledError):
        blocker.result(WAIT)
    runtime.close(timeout=WAIT)

    assert set(recorder.calls) == set(spec_functions()), "hooks the runtime never called"
    assert recorder.calls["ldm_model_loaded"] == 1
    assert recorder.calls["ldm_runtime_started"] == recorder.calls["ldm_runtime_closing"] == 1
    assert recorder.evictions == ["release"]
    event_types = {type(e) for e in recorder.events}
    all_events = {c for c in vars(jobs).values() if isinstance(c, type) and issubclass(c, JobEvent)}
    assert event_types == all_events - {JobEvent}
