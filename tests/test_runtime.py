"""Runtime: plugin discovery and switches, device/dtype policy, model cache, job queue, previews."""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from ldm_sdk.devices import Accelerators, parse_dtype, select_device, select_dtype
from ldm_sdk.diffusion.denoiser import Prediction
from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
from ldm_sdk.hookspecs import hookimpl
from ldm_sdk.jobs import (
    JobCancelled,
    JobCancelledError,
    JobContext,
    JobEvent,
    JobFailed,
    JobFinished,
    JobProgress,
    JobQueued,
    JobStarted,
    JobStatus,
)
from ldm_sdk.preview import latent_to_rgb, preview_image
from ldm_sdk.registry import DuplicateNameError
from ldm_sdk.runtime import _SHARED, PluginLoadError, Runtime
from ldm_sdk.runtime_cache import ModelCache, ModelKey, module_nbytes
from ldm_sdk.samplers import ddim
from ldm_sdk.samplers.base import ddim_timesteps

WAIT = 10.0  # seconds; only ever reached when a test is about to fail


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "LDM_SDK_DISABLE_PLUGINS",
        "LDM_SDK_TRACE_PLUGINS",
        "LDM_SDK_NO_ENTRYPOINTS",
        "LDM_SDK_DEVICE",
        "LDM_SDK_DTYPE",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def rt() -> Iterator[Runtime]:
    runtime = Runtime.create(load_entrypoints=False, disabled_plugins=("builtin",), device="cpu")
    yield runtime
    runtime.close(timeout=WAIT)


class SamplerPlugin:
    """Registers one sampler."""

    __version__ = "1.2.3"

    def __init__(self, name: str = "my_sampler") -> None:
        self.name = name

    @hookimpl
    def ldm_register_samplers(self, registry: Any) -> None:
        registry.add(self.name, sample_identity)


def sample_identity(denoiser: Any, x: torch.Tensor, timesteps: torch.Tensor, **_: Any) -> torch.Tensor:
    """Returns x unchanged."""
    return x


# -- plugins ---------------------------------------------------------------------------------------------


def test_plugin_registered_at_runtime_adds_a_sampler(rt: Runtime) -> None:
    with pytest.raises(KeyError, match="no sampler is registered"):
        rt.registries.samplers.get("my_sampler")
    name = rt.register_plugin(SamplerPlugin(), name="mine")
    assert name == "mine"
    assert rt.registries.samplers.get("my_sampler") is sample_identity
    info = {p.name: p for p in rt.plugins()}["mine"]
    assert (info.version, info.source, info.enabled) == ("1.2.3", "runtime", True)
    assert info.registered == {"samplers": ("my_sampler",)}
    rt.unregister_plugin("mine")
    assert "my_sampler" not in rt.registries.samplers


def test_duplicate_sampler_from_second_plugin_is_refused_and_rolled_back(rt: Runtime) -> None:
    rt.register_plugin(SamplerPlugin(), name="first")
    with pytest.raises(DuplicateNameError, match="'first' and by plugin 'second'"):
        rt.register_plugin(SamplerPlugin(), name="second")
    assert [p.name for p in rt.plugins() if p.enabled] == ["first"]
    assert rt.registries.samplers.entry("my_sampler").plugin == "first"


def test_unknown_hook_in_a_plugin_lists_the_valid_hooks(rt: Runtime) -> None:
    class Typo:
        @hookimpl
        def ldm_register_sampler(self, registry: Any) -> None:  # missing "s"
            pass

    with pytest.raises(PluginLoadError, match=r"valid hooks: .*ldm_register_samplers"):
        rt.register_plugin(Typo(), name="typo")
    assert "typo" not in [p.name for p in rt.plugins()]


class FakeEntryPoint:
    def __init__(self, name: str, target: object, dist: str, loads: list[str]) -> None:
        self.name, self.value, self.group = name, f"{dist}.plugin", "ldm_sdk"
        self.dist = SimpleNamespace(name=dist, version="0.4.2")
        self._target, self._loads = target, loads

    def load(self) -> object:
        self._loads.append(self.name)
        if isinstance(self._target, BaseException):
            raise self._target
        return self._target


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, eps: list[FakeEntryPoint]) -> list[str]:
    groups: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return eps if group == "ldm_sdk" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return groups


def test_entry_points_load_and_disabled_ones_are_never_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    eps = [
        FakeEntryPoint("good", SamplerPlugin("good_sampler"), "ldm-sdk-plugin-good", loads),
        FakeEntryPoint(
            "broken", AssertionError("a disabled plugin was imported"), "ldm-sdk-plugin-bad", loads
        ),
        FakeEntryPoint("other", SamplerPlugin("other_sampler"), "ldm-sdk-plugin-other", loads),
    ]
    fake_entry_points(monkeypatch, eps)
    monkeypatch.setenv("LDM_SDK_DISABLE_PLUGINS", "broken, builtin")
    with Runtime.create(device="cpu", disabled_plugins=["other"]) as runtime:
        assert loads == ["good"]
        assert runtime.registries.samplers.names() == ["good_sampler"]
        listing = {p.name: p for p in runtime.plugins()}
        assert listing["good"].distribution == "ldm-sdk-plugin-good"
        assert listing["good"].version == "0.4.2"
        assert listing["good"].registered == {"samplers": ("good_sampler",)}
        assert [(n, listing[n].enabled) for n in ("broken", "builtin", "other")] == [
            ("broken", False),
            ("builtin", False),
            ("other", False),
        ]
        with pytest.raises(ValueError, match="disabled"):
            runtime.register_plugin(SamplerPlugin("x"), name="other")


def test_a_broken_entry_point_says_how_to_disable_it(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [FakeEntryPoint("broken", ImportError("no module named foo"), "ldm-sdk-plugin-bad", [])]
    fake_entry_points(monkeypatch, eps)
    with pytest.raises(PluginLoadError, match="LDM_SDK_DISABLE_PLUGINS=broken"):
        Runtime.create(device="cpu", disabled_plugins=["builtin"])


def test_no_entrypoints_switch_skips_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = fake_entry_points(monkeypatch, [])
    monkeypatch.setenv("LDM_SDK_NO_ENTRYPOINTS", "1")
    Runtime.create(device="cpu", disabled_plugins=["builtin"]).close()
    assert groups == []
    monkeypatch.setenv("LDM_SDK_NO_ENTRYPOINTS", "0")
    Runtime.create(device="cpu", disabled_plugins=["builtin"]).close()
    assert groups == ["ldm_sdk"]


def test_trace_switch_logs_hook_calls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LDM_SDK_TRACE_PLUGINS", "1")
    with caplog.at_level(logging.DEBUG, logger="ldm_sdk.plugins"):
        runtime = Runtime.create(
            load_entrypoints=False, device="cpu", disabled_plugins=["builtin"], plugins=[SamplerPlugin()]
        )
        runtime.close()
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "ldm_sdk.plugins")
    assert "ldm_register_samplers(registry=Registry('sampler', [])) -> ['" in text
    assert "ldm_runtime_started(runtime=<Runtime>)" in text
    assert "ldm_runtime_closing done in" in text


def test_shared_runtime_is_created_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDM_SDK_NO_ENTRYPOINTS", "1")
    monkeypatch.setenv("LDM_SDK_DISABLE_PLUGINS", "builtin")
    monkeypatch.setenv("LDM_SDK_DEVICE", "cpu")
    if _SHARED.runtime is not None:  # left by another test module
        _SHARED.runtime.close()
    seen: list[Runtime] = []
    threads = [threading.Thread(target=lambda: seen.append(Runtime.shared())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    first = seen[0]
    assert len(seen) == 4 and all(r is first for r in seen)
    first.close()
    assert _SHARED.runtime is None
    second = Runtime.shared()
    assert second is not first
    second.close()


# -- device and dtype policy -------------------------------------------------------------------------------

NONE = Accelerators()
CUDA_BF16 = Accelerators(cuda_count=2, cuda_bf16=True)
CUDA_OLD = Accelerators(cuda_count=1, cuda_bf16=False)
MPS = Accelerators(mps=True)


@pytest.mark.parametrize(
    ("acc", "device", "dtype"),
    [
        (NONE, "cpu", torch.float32),
        (CUDA_BF16, "cuda:0", torch.bfloat16),
        (CUDA_OLD, "cuda:0", torch.float16),
        (MPS, "mps", torch.float16),
    ],
)
def test_automatic_device_and_dtype(acc: Accelerators, device: str, dtype: torch.dtype) -> None:
    chosen = select_device(accelerators=acc, env={})
    assert str(chosen) == device
    assert select_dtype(chosen, accelerators=acc, env={}) == dtype


def test_device_override_by_env_and_argument() -> None:
    assert str(select_device(accelerators=CUDA_BF16, env={"LDM_SDK_DEVICE": "cpu"})) == "cpu"
    assert str(select_device("cuda:1", accelerators=CUDA_BF16, env={"LDM_SDK_DEVICE": "cpu"})) == "cuda:1"
    assert str(select_device("cuda", accelerators=CUDA_BF16, env={})) == "cuda:0"
    with pytest.raises(ValueError, match=r"available: cuda:0, cuda:1, cpu"):
        select_device("cuda:2", accelerators=CUDA_BF16, env={})
    with pytest.raises(ValueError, match="available: cpu"):
        select_device("mps", accelerators=NONE, env={})
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        select_device("gpu", accelerators=NONE, env={})


def test_dtype_requests() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert select_dtype(cpu, "bf16", accelerators=NONE, env={}) == torch.bfloat16
    assert select_dtype(cpu, accelerators=NONE, env={"LDM_SDK_DTYPE": "bfloat16"}) == torch.bfloat16
    assert select_dtype(cuda, "fp32", accelerators=CUDA_BF16, env={}) == torch.float32
    with pytest.raises(ValueError, match=r"fp16 is not supported on CPU; valid on CPU: fp32 .* bf16"):
        select_dtype(cpu, "fp16", accelerators=NONE, env={})
    with pytest.raises(ValueError, match="bf16 is not supported on cuda:0"):
        select_dtype(cuda, torch.bfloat16, accelerators=CUDA_OLD, env={})
    with pytest.raises(ValueError, match="unknown dtype 'int8'; valid: fp32"):
        parse_dtype("int8")


# -- model cache -------------------------------------------------------------------------------------------


class Loads:
    """Counting loaders of small modules with known sizes (fp32: 4 bytes per element)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def loader(self, name: str, features: int) -> Any:
        def load() -> nn.Module:
            self.calls[name] = self.calls.get(name, 0) + 1
            return nn.Linear(features, 10, bias=False)  # features * 10 * 4 bytes

        return load


def key(name: str) -> ModelKey:
    return ModelKey(content=name * 8)


def test_module_size_counts_parameters_and_buffers_once() -> None:
    module = nn.BatchNorm1d(5)  # weight, bias, running_mean, running_var (fp32) + num_batches_tracked (int64)
    assert module_nbytes(module) == 4 * 5 * 4 + 8
    shared = nn.Linear(3, 3, bias=False)
    assert module_nbytes(nn.Sequential(shared, shared)) == 36


def test_cache_evicts_lru_under_budget_and_reloads_on_demand() -> None:
    loads, evicted = Loads(), []
    cache = ModelCache(1000, on_evicted=lambda k, reason: evicted.append((k.content[0], reason)))
    a = cache.get(key("a"), loads.loader("a", 10))  # 400 bytes
    cache.get(key("b"), loads.loader("b", 10))  # 800 in all
    assert cache.get(key("a")) is a  # a is now the most recently used
    cache.get(key("c"), loads.loader("c", 10))  # 1200 > 1000: b (LRU) leaves
    assert evicted == [("b", "budget")]
    assert cache.resident() == [key("a"), key("c")]
    cache.get(key("b"))  # reloaded with the remembered loader; a is LRU now
    assert loads.calls == {"a": 1, "b": 2, "c": 1}
    assert evicted == [("b", "budget"), ("a", "budget")]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 4, 2)
    assert (stats.resident_bytes, stats.models) == (800, 2)
    with pytest.raises(KeyError, match="was never loaded and no loader was given"):
        cache.get(key("z"))


def test_a_model_larger_than_the_budget_is_kept_alone(caplog: pytest.LogCaptureFixture) -> None:
    loads = Loads()
    cache = ModelCache(500)
    cache.get(key("a"), loads.loader("a", 10))
    with caplog.at_level(logging.WARNING, logger="ldm_sdk.runtime"):
        cache.get(key("b"), loads.loader("b", 20))  # 800 bytes
    assert cache.resident() == [key("b")]
    assert "more than the whole memory budget" in caplog.text


def test_make_room_evicts_the_lru_other_model_on_the_same_device() -> None:
    """A full device (a capture that found no memory): the least recently used resident model on the kept
    model's device leaves -- not the kept one, not one on another device -- until none is left."""
    loads, evicted = Loads(), []
    cache = ModelCache(on_evicted=lambda k, reason: evicted.append((k.content[0], reason)))
    a = cache.get(key("a"), loads.loader("a", 10))
    elsewhere = ModelKey(content="m" * 8, device="meta")
    cache.get(elsewhere, lambda: nn.Linear(10, 10, device="meta"))
    b = cache.get(key("b"), loads.loader("b", 10))
    c = cache.get(key("c"), loads.loader("c", 10))
    cache.attachment(a, "graphs", Attached)
    assert cache.make_room(b) == key("a")  # the LRU of the CPU's models, b kept
    assert cache.attachments(a) == {} and evicted == [("a", "device memory")]
    assert cache.make_room(b) == key("c")
    assert cache.make_room(b) is None  # b is alone on the CPU: the meta model stays
    assert cache.resident() == [elsewhere, key("b")] and cache.stats().evictions == 2
    assert cache.get(key("c")) is not c and loads.calls["c"] == 2  # reloaded when next used


def test_a_load_out_of_device_memory_frees_graphs_then_evicts_and_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model that does not fit beside the resident ones (the device's memory, not the budget): the cache
    first drops what is kept with them (their captured graphs), then evicts the least recently used one
    at a time, retrying the load after each; with nothing left to free the error stands."""
    loads, evicted = Loads(), []
    cache = ModelCache(on_evicted=lambda k, reason: evicted.append((k.content[0], reason)))
    a = cache.get(key("a"), loads.loader("a", 10))
    b = cache.get(key("b"), loads.loader("b", 10))
    graphs = weakref.ref(cache.attachment(a, "graphs", Attached))
    tries = []

    def crowded() -> nn.Module:  # the device holds one model beside the new one
        tries.append(len(cache.resident()))
        if len(cache.resident()) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return nn.Linear(10, 10)

    with caplog.at_level(logging.WARNING, logger="ldm_sdk.runtime"):
        c = cache.get(key("c"), crowded)
    assert tries == [2, 2, 1] and graphs() is None  # graphs dropped first, then a evicted
    assert evicted == [("a", "device memory")] and cache.resident() == [key("b"), key("c")]
    assert "released the graphs of 1 model" in caplog.text and "evicted model" in caplog.text
    assert cache.get(key("b")) is b and cache.get(key("c")) is c

    def never() -> nn.Module:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache.get(key("d"), never)  # b and c leave one by one, then nothing is left to free
    assert cache.resident() == [] and key("d") not in cache


def test_release_evicts_everything_and_next_get_reloads(rt: Runtime) -> None:
    loads, evicted = Loads(), []

    class Observer:
        @hookimpl
        def ldm_model_evicted(self, runtime: Runtime, key: ModelKey, reason: str) -> None:
            evicted.append((key.content[0], reason))

    rt.register_plugin(Observer())
    rt.get_model(key("a"), loads.loader("a", 4))
    rt.get_model(key("b"), loads.loader("b", 4))
    assert rt.release() == 2 * 160
    assert rt.cache.resident() == []
    assert evicted == [("a", "release"), ("b", "release")]
    rt.get_model(key("a"))
    assert loads.calls == {"a": 2, "b": 1}


def test_release_offload_moves_accelerator_models_to_cpu_and_back_without_reloading() -> None:
    moves: list[str] = []

    class Recorded(nn.Linear):
        def to(self, *args: Any, **kwargs: Any) -> Recorded:  # record instead of moving (no GPU here)
            moves.append(str(args[0]))
            return self

    calls: list[int] = []

    def load() -> nn.Module:
        calls.append(1)
        return Recorded(2, 2)

    cache = ModelCache()
    gpu_key, cpu_key = ModelKey("g" * 8, device="cuda:0"), ModelKey("c" * 8, device="cpu")
    model = cache.get(gpu_key, load)
    cache.get(cpu_key, load)
    assert cache.release(offload=True) == 24  # only the accelerator-resident one left its device
    assert moves == ["cpu"] and cache.resident() == [cpu_key]
    assert cache.get(gpu_key) is model
    assert moves == ["cpu", "cuda:0"] and len(calls) == 2


class Attached:
    """A stand-in for what is kept with a model (the tasks keep its CapturedModel)."""


def test_attachments_live_while_the_model_is_resident_and_are_not_counted() -> None:
    loads, made = Loads(), []

    def factory() -> Attached:
        made.append(weakref.ref(attached := Attached()))
        return attached

    cache = ModelCache(1000)
    a = cache.get(key("a"), loads.loader("a", 10))  # 400 bytes
    first = cache.attachment(a, "graphs", factory)
    assert made[0]() is first and cache.attachment(a, "graphs", factory) is first and len(made) == 1
    assert cache.attachments(a) == {"graphs": first}
    assert cache.stats().resident_bytes == 400 == module_nbytes(a)  # the attachment is not in the budget
    stranger = nn.Linear(2, 2)  # not in the cache (a model given in memory): nothing kept, nothing made
    assert cache.attachment(stranger, "graphs", factory) is None and len(made) == 1
    assert cache.attachments(stranger) == {}
    del first
    # evicted under the budget: the attachment goes with the model (nothing else holds it: it is freed)
    b = cache.get(key("b"), loads.loader("b", 10))
    cache.attachment(b, "graphs", factory)
    cache.get(key("c"), loads.loader("c", 10))  # a (least recently used) leaves
    assert cache.resident() == [key("b"), key("c")]
    assert cache.attachments(a) == {} and cache.attachment(a, "graphs", factory) is None
    assert made[0]() is None and made[1]() is not None
    again = cache.get(key("a"))  # reloaded: a new model, which starts without attachments
    assert again is not a and cache.attachments(again) == {}
    cache.attachment(again, "graphs", factory)
    assert len(made) == 3 and made[2]() is not None
    # release and clear drop them too
    cache.release()
    assert cache.attachments(again) == {} and made[1]() is None and made[2]() is None
    third = cache.get(key("a"))
    cache.attachment(third, "graphs", factory)
    cache.clear()
    assert cache.attachments(third) == {} and made[3]() is None


def test_resident_attachments_lists_each_resident_models() -> None:
    cache = ModelCache(1000)
    loads = Loads()
    a = cache.get(key("a"), loads.loader("a", 10))
    b = cache.get(key("b"), loads.loader("b", 10))
    cache.get(key("c"), loads.loader("c", 2))  # resident, nothing attached
    first, second = Attached(), Attached()
    cache.attachment(a, "graphs", lambda: first)
    cache.attachment(b, "graphs", lambda: second)
    assert cache.resident_attachments() == [{"graphs": first}, {"graphs": second}, {}]
    cache.release()
    assert cache.resident_attachments() == []


def test_an_attachment_made_while_its_model_leaves_is_not_kept() -> None:
    cache = ModelCache()
    model = cache.get(key("a"), Loads().loader("a", 2))

    def factory() -> Attached:
        cache.release()  # the model leaves while the attachment is made (another thread, in real life)
        return Attached()

    made = cache.attachment(model, "graphs", factory)
    assert isinstance(made, Attached) and cache.attachments(model) == {}


def test_offload_drops_attachments_of_models_that_leave_their_device() -> None:
    class Recorded(nn.Linear):
        def to(self, *args: Any, **kwargs: Any) -> Recorded:  # record instead of moving (no GPU here)
            return self

    cache = ModelCache()
    gpu_key, cpu_key = ModelKey("g" * 8, device="cuda:0"), ModelKey("c" * 8, device="cpu")
    gpu_model = cache.get(gpu_key, lambda: Recorded(2, 2))
    cpu_model = cache.get(cpu_key, lambda: Recorded(2, 2))
    kept = {m: cache.attachment(m, "graphs", Attached) for m in (gpu_model, cpu_model)}
    cache.release(offload=True)
    # graphs captured on the device read the weights where they were: they go when the weights move
    assert cache.attachments(gpu_model) == {}
    assert cache.attachments(cpu_model) == {"graphs": kept[cpu_model]}  # stayed where it was
    assert cache.get(gpu_key) is gpu_model and cache.attachments(gpu_model) == {}
    assert cache.attachment(gpu_model, "graphs", Attached) is not kept[gpu_model]


def test_runtime_capture_mode() -> None:
    with pytest.raises(ValueError, match="unknown capture mode 'graphs'; valid: auto, off, emulate"):
        Runtime.create(load_entrypoints=False, device="cpu", capture_mode="graphs")
    with Runtime.create(load_entrypoints=False, device="cpu", capture_mode="emulate") as runtime:
        assert runtime.capture_mode == "emulate"


def test_fused_kernels_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDM_SDK_FUSED_KERNELS", raising=False)
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert runtime.fused_kernels is True
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("LDM_SDK_FUSED_KERNELS", off)
        with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
            assert runtime.fused_kernels is False
    with Runtime.create(load_entrypoints=False, device="cpu", fused_kernels=True) as runtime:
        assert runtime.fused_kernels is True  # the argument wins over the environment


def test_cpu_fast_path_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDM_SDK_CPU_FAST_PATH", raising=False)
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert runtime.cpu_fast_path is True
    monkeypatch.setenv("LDM_SDK_CPU_FAST_PATH", "0")
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert runtime.cpu_fast_path is False
    with Runtime.create(load_entrypoints=False, device="cpu", cpu_fast_path=True) as runtime:
        assert runtime.cpu_fast_path is True  # the argument wins over the environment


def test_prompt_cache_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LDM_SDK_PROMPT_CACHE", raising=False)
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert runtime.prompt_cache.capacity == 32
    monkeypatch.setenv("LDM_SDK_PROMPT_CACHE", "0")
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert runtime.prompt_cache.capacity == 0
    with Runtime.create(load_entrypoints=False, device="cpu", prompt_cache_size=3) as runtime:
        assert runtime.prompt_cache.capacity == 3  # the argument wins over the environment
    for bad in ("many", "-2", "1.5"):
        monkeypatch.setenv("LDM_SDK_PROMPT_CACHE", bad)
        with pytest.raises(ValueError, match=r"\$LDM_SDK_PROMPT_CACHE must be a whole number >= 0"):
            Runtime.create(load_entrypoints=False, device="cpu")
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        Runtime.create(load_entrypoints=False, device="cpu", prompt_cache_size=-1)


def test_release_and_close_drop_the_encoded_prompts() -> None:
    encoder = nn.Linear(2, 2).eval()
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        runtime.prompt_cache.encode(encoder, "a", lambda: torch.zeros(1))
        assert len(runtime.prompt_cache) == 1
        runtime.release()
        assert len(runtime.prompt_cache) == 0
        runtime.prompt_cache.encode(encoder, "a", lambda: torch.zeros(1))
    assert len(runtime.prompt_cache) == 0


def test_models_loaded_on_the_cpu_get_the_cpu_fast_path(tmp_path: Path) -> None:
    """The cross-attention K/V cache for fp32 and bf16, channels_last convolution weights for bf16 only,
    nothing with the option off. fp32 computes the same bits; bf16 the same up to bf16 rounding (the cache
    is exact, channels_last changes oneDNN's kernels)."""
    from ldm_sdk.accel.kv_cache import context_cache_of
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import save
    from ldm_sdk.diffusion.conditioning import Conditioning
    from tests.tiny_configs import SD1, random_bundle

    path = save(random_bundle(SD1), tmp_path / "sd.safetensors")

    def prepared(bundle: nn.Module) -> tuple[bool, bool]:
        assert isinstance(bundle, ModelBundle) and bundle.model is not None
        convs = [
            m.weight for m in bundle.model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
        ]
        last = all(
            w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
        )
        return last, context_cache_of(bundle.model) is not None

    g = torch.Generator().manual_seed(0)
    x, ctx, t = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 7, 32, generator=g),
        torch.tensor([5.0, 700.0]),
    )
    outs, outs32 = {}, {}
    for fast in (True, False):
        with Runtime.create(load_entrypoints=False, device="cpu", cpu_fast_path=fast) as rt:
            fp32 = rt.load_model(path, dtype="fp32")
            assert prepared(fp32) == (False, fast)
            bundle = rt.load_model(path, dtype="bf16")
            assert prepared(bundle) == (fast, fast)
            assert isinstance(bundle, ModelBundle) and bundle.model is not None
            assert isinstance(fp32, ModelBundle)
            with torch.inference_mode():
                outs[fast] = bundle.apply_model(x.bfloat16(), t, Conditioning(crossattn=ctx.bfloat16()))
                # twice: the second call takes the cached projections
                outs32[fast] = [fp32.apply_model(x, t, Conditioning(crossattn=ctx)) for _ in range(2)]
            cache = context_cache_of(fp32.model)  # type: ignore[arg-type]
            assert (cache is not None and cache.stats.hits > 0) == fast
    err = float((outs[True].float() - outs[False].float()).abs().max() / outs[False].float().abs().max())
    assert err < 2e-2, err
    assert all(torch.equal(a, outs32[False][0]) for a in (*outs32[True], outs32[False][1]))


def test_bf16_cpu_models_are_prepacked_when_the_copy_fits_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 models loaded on the CPU get prepacked weights while that second copy takes at most 1/16 of the
    machine's memory; the results are the same bits either way. fp32 models never do (the packed kernels
    are channels_last, which changes fp32 results)."""
    from ldm_sdk.accel import cpu_prepack
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import save
    from ldm_sdk.diffusion.conditioning import Conditioning
    from tests.tiny_configs import SD1, random_bundle

    if not cpu_prepack.prepack_available():
        pytest.skip("this torch build lacks the oneDNN / MKL prepacked ops")
    path = save(random_bundle(SD1), tmp_path / "sd.safetensors")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 7, 32, generator=g),
        torch.tensor([5.0, 7.0]),
    )

    def packed(bundle: nn.Module) -> int:
        return sum(
            isinstance(m, cpu_prepack.PackedConv2d | cpu_prepack.PackedLinear) for m in bundle.modules()
        )

    outs = []
    for room in (True, False):
        with Runtime.create(load_entrypoints=False, device="cpu") as rt:
            if not room:
                # the bf16 copy (half the fp32 weights) would be 1/15 of the memory
                copy = cpu_prepack.packable_bytes(rt.load_model(path, dtype="fp32")) // 2
                monkeypatch.setattr(cpu_prepack, "physical_memory_bytes", lambda copy=copy: copy * 15)
            bundle = rt.load_model(path, dtype="bf16")
            assert isinstance(bundle, ModelBundle)
            assert (packed(bundle) > 0) == room and packed(rt.load_model(path, dtype="fp32")) == 0
            with torch.inference_mode():
                outs.append(bundle.apply_model(x.bfloat16(), t, Conditioning(crossattn=ctx.bfloat16())))
    assert torch.equal(outs[0], outs[1])


def test_models_loaded_on_the_cpu_are_never_fused(tmp_path: Path) -> None:
    from ldm_sdk.accel.fusion import FusedGroupNorm
    from ldm_sdk.checkpoints.loader import save
    from tests.tiny_configs import KL_F8_FIRST_STAGE, random_bundle

    path = save(random_bundle(KL_F8_FIRST_STAGE), tmp_path / "ae.safetensors")
    with Runtime.create(load_entrypoints=False, device="cpu", fused_kernels=True) as rt:
        for dtype in ("fp32", "bf16"):
            model = rt.load_model(path, dtype=dtype)
            assert not any(isinstance(m, FusedGroupNorm) for m in model.modules()), dtype


@pytest.mark.gpu
def test_half_precision_models_on_cuda_are_fused_at_load(tmp_path: Path) -> None:
    from ldm_sdk.accel.fusion import AbsorbedSiLU, FusedGroupNorm
    from ldm_sdk.checkpoints.loader import save
    from tests.tiny_configs import KL_F8_FIRST_STAGE, random_bundle

    path = save(random_bundle(KL_F8_FIRST_STAGE), tmp_path / "ae.safetensors")

    def fused(model: nn.Module) -> tuple[int, int]:
        mods = list(model.modules())
        norms = sum(isinstance(m, FusedGroupNorm) for m in mods)
        return norms, sum(isinstance(m, AbsorbedSiLU) for m in mods)

    with Runtime.create(load_entrypoints=False, device="cuda") as rt:
        assert fused(rt.load_model(path, dtype="fp32")) == (0, 0)
        half = rt.load_model(path, dtype="fp16")
        norms, silus = fused(half)
        assert norms > 0 and silus > 0
        convs = [p for p in half.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    with Runtime.create(load_entrypoints=False, device="cuda", fused_kernels=False) as rt:
        assert fused(rt.load_model(path, dtype="fp16")) == (0, 0)


def test_concurrent_gets_of_one_key_load_once() -> None:
    cache = ModelCache()
    started, go = threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_load() -> nn.Module:
        calls.append(1)
        started.set()
        assert go.wait(WAIT)
        return nn.Linear(2, 2)

    class CountingEvent(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.waiters = 0
            self.cond = threading.Condition()

        def wait(self, timeout: float | None = None) -> bool:
            with self.cond:
                self.waiters += 1
                self.cond.notify_all()
            return super().wait(timeout)

    results: list[nn.Module] = []
    owner = threading.Thread(target=lambda: results.append(cache.get(key("m"), slow_load)))
    owner.start()
    assert started.wait(WAIT)
    counting = CountingEvent()
    cache._loading[key("m")].done = counting  # observe the waiters of this load
    others = [
        threading.Thread(target=lambda: results.append(cache.get(key("m"), slow_load))) for _ in range(3)
    ]
    for t in others:
        t.start()
    with counting.cond:
        assert counting.cond.wait_for(lambda: counting.waiters == 3, WAIT)
    go.set()
    for t in [owner, *others]:
        t.join(WAIT)
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)
    assert (cache.stats().misses, cache.stats().hits) == (1, 3)


def test_a_failed_load_reaches_every_waiter_and_the_next_get_retries() -> None:
    cache = ModelCache()

    def broken() -> nn.Module:
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        cache.get(key("x"), broken)
    assert cache.get(key("x"), lambda: nn.Linear(1, 1)) is not None


def test_model_key_follows_content_config_dtype_and_device(rt: Runtime, tmp_path: Path) -> None:
    one, same, other = tmp_path / "one.ckpt", tmp_path / "copy.ckpt", tmp_path / "other.ckpt"
    one.write_bytes(b"weights")
    same.write_bytes(b"weights")
    other.write_bytes(b"different")
    base = rt.model_key(one)
    assert base == rt.model_key(same)  # keyed by content, not by path
    assert base.content == hashlib.sha256(b"weights").hexdigest()
    assert base != rt.model_key(other)
    assert base.dtype == "fp32" and base.device == "cpu"
    assert rt.model_key(one, dtype="bf16").dtype == "bf16"
    assert rt.model_key(one, use_ema=True).variant == "ema"
    assert rt.model_key(one, {"a": 1}) != base != rt.model_key(one, {"a": 2})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        rt.model_key(tmp_path / "missing.ckpt")


def test_load_model_reads_a_checkpoint_once_through_the_cache(tmp_path: Path) -> None:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import save
    from tests.tiny_configs import KL_F8_FIRST_STAGE, random_bundle

    path = save(random_bundle(KL_F8_FIRST_STAGE), tmp_path / "ae.safetensors")
    loaded: list[ModelKey] = []

    class Observer:
        @hookimpl
        def ldm_model_loaded(self, runtime: Runtime, key: ModelKey, model: nn.Module) -> None:
            loaded.append(key)

    rt = Runtime.create(load_entrypoints=False, device="cpu", plugins=[Observer()])
    first = rt.load_model(path)
    assert isinstance(first, ModelBundle) and rt.load_model(path) is first
    assert loaded == [rt.model_key(path)]
    half = rt.load_model(path, dtype="bf16")
    assert half is not first and next(half.parameters()).dtype == torch.bfloat16
    assert [k.dtype for k in loaded] == ["fp32", "bf16"]
    stats = rt.cache_stats()
    assert (stats.hits, stats.misses, stats.models) == (1, 2, 2)
    rt.close()


# -- job queue ---------------------------------------------------------------------------------------------


def test_jobs_from_two_client_threads_get_their_own_results(rt: Runtime) -> None:
    jobs: dict[tuple[int, int], Any] = {}
    lock = threading.Lock()

    def client(c: int) -> None:
        for i in range(5):
            x = torch.full((3,), float(c * 100 + i))
            job = rt.submit(lambda ctx, x=x: (x * 2).sum().item(), name=f"c{c}-{i}")
            with lock:
                jobs[(c, i)] = job

    threads = [threading.Thread(target=client, args=(c,)) for c in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(jobs) == 10
    for (c, i), job in jobs.items():
        assert job.result(WAIT) == 6.0 * (c * 100 + i)
        assert job.status == JobStatus.FINISHED
    assert len({job.id for job in jobs.values()}) == 10


class CountingDenoiser:
    """x0 = x, eps = 0: a stand-in network that counts its calls and can hold one call until released."""

    def __init__(self, hold_at: int) -> None:
        self.schedule = DiffusionSchedule(make_beta_schedule("linear", 1000))
        self.calls = 0
        self.hold_at = hold_at
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        self.calls += 1
        if self.calls == self.hold_at:
            self.reached.set()
            assert self.release.wait(WAIT)
        return Prediction(eps=torch.zeros_like(x), x0=x)


def test_cancel_stops_a_running_sampler_within_one_step(rt: Runtime) -> None:
    events: list[JobEvent] = []
    rt.subscribe(events.append)
    denoiser = CountingDenoiser(hold_at=3)

    def job(ctx: JobContext) -> torch.Tensor:
        x = torch.randn(1, 4, 8, 8)
        return ddim.sample(denoiser, x, ddim_timesteps(20), callback=ctx.step_callback(preview_every=2))

    running = rt.submit(job, name="render")
    assert denoiser.reached.wait(WAIT)  # step 3 (of 20) is in the model call
    assert running.cancel() is True
    denoiser.release.set()
    with pytest.raises(JobCancelledError):
        running.result(WAIT)
    assert denoiser.calls == 3  # the step in flight finished; no further model call
    assert running.status == JobStatus.CANCELLED
    progress = [e for e in events if isinstance(e, JobProgress)]
    assert [(e.step, e.total) for e in progress] == [(1, 20), (2, 20), (3, 20)]
    assert [e.preview is not None for e in progress] == [False, True, False]
    assert progress[1].preview.shape == (8, 8, 3) and progress[1].preview.dtype == torch.uint8
    assert isinstance(events[-1], JobCancelled) and events[-1].started is True
    assert running.cancel() is False  # already over


def hold(rt: Runtime, gate: threading.Event) -> Any:
    """Submit a job that occupies the worker until ``gate`` is set; returns once it is running."""
    started = threading.Event()

    def job(ctx: JobContext) -> str:
        started.set()
        assert gate.wait(WAIT)
        return "held"

    submitted = rt.submit(job, name="blocker")
    assert started.wait(WAIT)
    return submitted


def test_priority_order_and_fifo_within_a_priority(rt: Runtime) -> None:
    gate, order = threading.Event(), []
    blocker = hold(rt, gate)
    jobs = [
        rt.submit(lambda ctx, n=n: order.append(n), priority=p, name=n)
        for n, p in [("low", -1), ("mid-1", 0), ("high", 5), ("mid-2", 0), ("top", 9)]
    ]
    assert [j.name for j in rt.pending_jobs()] == ["top", "high", "mid-1", "mid-2", "low"]
    gate.set()
    for job in [blocker, *jobs]:
        job.result(WAIT)
    assert order == ["top", "high", "mid-1", "mid-2", "low"]


def test_a_cancelled_queued_job_never_starts(rt: Runtime) -> None:
    gate, ran, events = threading.Event(), [], []
    rt.subscribe(events.append)
    blocker = hold(rt, gate)
    queued = rt.submit(lambda ctx: ran.append(1), name="queued")
    assert queued.cancel() is True
    assert queued.status == JobStatus.CANCELLED and queued.done()
    gate.set()
    blocker.result(WAIT)
    follower = rt.submit(lambda ctx: "after")
    assert follower.result(WAIT) == "after"
    assert ran == []
    kinds = [type(e).__name__ for e in events if e.job_id == queued.id]
    assert kinds == ["JobQueued", "JobCancelled"]
    with pytest.raises(JobCancelledError, match="was cancelled"):
        queued.result(0)


def test_a_failing_job_reports_its_exception_and_the_worker_goes_on(rt: Runtime) -> None:
    events: list[JobEvent] = []
    rt.subscribe(events.append)

    def boom(ctx: JobContext) -> None:
        assert ctx.runtime is rt and ctx.job.name == "boom"
        ctx.progress(1, 2)
        raise ZeroDivisionError("bad step")

    failing = rt.submit(boom, name="boom")
    with pytest.raises(ZeroDivisionError, match="bad step"):
        failing.result(WAIT)
    assert rt.submit(lambda ctx: 42).result(WAIT) == 42
    mine = [e for e in events if e.job_id == failing.id]
    assert [type(e) for e in mine] == [JobQueued, JobStarted, JobProgress, JobFailed]
    assert isinstance(mine[-1], JobFailed) and isinstance(mine[-1].error, ZeroDivisionError)
    ok = [type(e) for e in events if e.job_id != failing.id]
    assert ok == [JobQueued, JobStarted, JobFinished]


def test_result_timeout_and_close_cancels_pending_work() -> None:
    runtime = Runtime.create(load_entrypoints=False, disabled_plugins=["builtin"], device="cpu")
    started, gate = threading.Event(), threading.Event()
    running = runtime.submit(lambda ctx: [started.set(), gate.wait(WAIT), ctx.check_cancelled()])
    queued = runtime.submit(lambda ctx: "never")
    assert started.wait(WAIT)
    with pytest.raises(TimeoutError, match="still"):
        queued.result(0.01)
    closer = threading.Thread(target=runtime.close, kwargs={"timeout": WAIT})
    closer.start()
    assert queued.wait(WAIT) and queued.status == JobStatus.CANCELLED
    gate.set()
    closer.join(WAIT)
    assert running.status == JobStatus.CANCELLED
    with pytest.raises(RuntimeError, match="closed"):
        runtime.submit(lambda ctx: None)


def test_a_broken_listener_does_not_stop_the_job(rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    def listener(event: JobEvent) -> None:
        raise ValueError("listener bug")

    rt.subscribe(listener)
    with caplog.at_level(logging.ERROR, logger="ldm_sdk.runtime"):
        assert rt.submit(lambda ctx: "ok").result(WAIT) == "ok"
    assert "listener bug" in caplog.text


# -- built-in plugin ------------------------------------------------------------------------------------


def test_builtin_plugin_registers_through_the_same_hooks(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ldm_sdk.samplers import SAMPLERS

    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        regs = runtime.registries
        assert regs.samplers.names() == sorted(SAMPLERS)
        assert all(e.plugin == "builtin" for e in regs.samplers.entries())
        assert regs.schedules.names() == ["cosine", "linear", "sqrt", "sqrt_linear"]
        betas = regs.schedules.get("linear")(1000)
        assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(2e-2)
        assert regs.checkpoint_formats.names() == ["ckpt", "diffusers", "safetensors"]
        assert len(regs.model_families) > 0
        tensors = {"w": torch.arange(4.0)}
        save_file(tensors, tmp_path / "m.safetensors")
        torch.save(tensors, tmp_path / "m.ckpt")
        folder = tmp_path / "pipe"
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
        kinds = {
            p.name: runtime.checkpoint_format(p)
            for p in (tmp_path / "m.safetensors", tmp_path / "m.ckpt", folder)
        }
        assert kinds == {"m.safetensors": "safetensors", "m.ckpt": "ckpt", "pipe": "diffusers"}
        (tmp_path / "notes.txt").write_text("not weights")
        with pytest.raises(
            ValueError, match=r"registered formats: ckpt \(.ckpt .pt .pth .bin\), diffusers \(folder\)"
        ):
            runtime.checkpoint_format(tmp_path / "notes.txt")


def test_load_model_of_a_diffusers_folder_goes_through_its_format(tmp_path: Path) -> None:
    from ldm_sdk.checkpoints.diffusers_format import to_diffusers
    from tests.tiny_configs import SD1, random_bundle

    original = random_bundle(SD1)
    folder = to_diffusers(original, tmp_path / "pipe")
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        loaded = runtime.load_model(folder, dtype="bf16")
        assert runtime.load_model(folder, dtype="bf16") is loaded
        name = "model.diffusion_model.out.2.weight"
        got, want = loaded.compvis_state_dict()[name], original.compvis_state_dict()[name]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
        with pytest.raises(ValueError, match="no EMA weights"):
            runtime.load_model(folder, use_ema=True)


# -- previews --------------------------------------------------------------------------------------------


def test_sd_latent_preview_uses_the_approximate_matrix() -> None:
    latent = torch.zeros(1, 4, 2, 2)
    latent[0, 0] = 1.0  # channel L1 only
    latent[0, 3, 1, 1] = 1.0  # plus L4 at one pixel
    rgb = latent_to_rgb(latent)
    expected_l1 = torch.tensor([0.298, 0.207, 0.208]) * 0.5 + 0.5
    expected_l1_l4 = torch.tensor([0.298 - 0.184, 0.207 - 0.271, 0.208 - 0.473]) * 0.5 + 0.5
    assert torch.allclose(rgb[0, :, 0, 0], expected_l1)
    assert torch.allclose(rgb[0, :, 1, 1], expected_l1_l4)


@pytest.mark.parametrize("channels", [1, 3, 8, 16])
def test_generic_preview_for_other_channel_counts(channels: int) -> None:
    latent = torch.randn(2, channels, 6, 5)
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (2, 3, 6, 5)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == pytest.approx(1.0)
    image = preview_image(torch.randn(1, channels, 300, 100), max_size=128)
    assert image.shape == (100, 34, 3) and image.dtype == torch.uint8


def test_preview_factors_must_match_the_channels() -> None:
    with pytest.raises(ValueError, match=r"a 3-channel latent needs \(3, 3\)"):
        latent_to_rgb(torch.zeros(1, 3, 2, 2), factors=((1.0, 0.0, 0.0),) * 4)


def test_preview_factors_cover_the_4_channel_families() -> None:
    from ldm_sdk.checkpoints.families import FAMILIES
    from ldm_sdk.preview import LATENT_RGB_FACTORS

    four = {n for n, f in FAMILIES.items() if f.config.first_stage.embed_dim == 4}
    assert four == set(LATENT_RGB_FACTORS)


@pytest.mark.gpu
def test_release_gives_the_vram_back_on_cuda() -> None:
    with Runtime.create(load_entrypoints=False, disabled_plugins=["builtin"]) as runtime:
        assert runtime.device.type == "cuda"
        assert runtime.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        gc.collect()  # earlier tests in this process may leave tensors to collect
        base, base_allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()

        def load() -> nn.Module:
            return nn.Linear(4096, 4096, bias=False).to(runtime.device, runtime.dtype)  # 32 MiB in bf16/fp16

        runtime.get_model(ModelKey("v" * 64, dtype="bf16", device=str(runtime.device)), load)
        job = runtime.submit(lambda ctx: float(torch.randn(2048, 2048, device=runtime.device).sum()))
        job.result(WAIT)
        assert torch.cuda.memory_reserved() >= base + 32 * 2**20
        assert runtime.release() == 32 * 2**20
        assert torch.cuda.memory_allocated() == base_allocated and torch.cuda.memory_reserved() <= base
