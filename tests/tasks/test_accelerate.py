"""The tasks' fast path (CPU): the ``accelerate`` request flag, and the CapturedModel kept per loaded model.

On CUDA a task samples through its model's :class:`~ldm_sdk.accel.graphs.CapturedModel` (CUDA graphs).
Here the runtime's ``capture_mode="emulate"`` runs the same wiring on the CPU -- static buffers, signature
cache, one CapturedModel per cached model, dropped with the model -- and every result must equal the eager
run bit for bit. ``tests/tasks/test_gpu_tasks.py`` checks the real graphs on a GPU.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ldm_sdk.accel.graphs import CapturedModel, CaptureError
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.hookspecs import hookimpl
from ldm_sdk.runtime import Runtime
from ldm_sdk.runtime_cache import module_nbytes
from ldm_sdk.tasks import get_task, runner
from ldm_sdk.tasks.base import (
    ClassRequest,
    Img2ImgRequest,
    InpaintRequest,
    TaskError,
    TaskInputs,
    TaskRequest,
    TaskResult,
    Txt2ImgRequest,
    UncondRequest,
)
from ldm_sdk.tasks.context import CAPTURED_DECODER, CAPTURED_ENCODER, CAPTURED_MODEL, TASK_MAX_GRAPHS
from ldm_sdk.tasks.images import read_image, save_outputs
from ldm_sdk.tasks.manifest import replay
from tests.tasks.tiny_models import tiny_bundle

SMALL = {"width": 32, "height": 32, "steps": 3}
IMAGE = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
MASK = np.zeros((32, 32), np.float32)
MASK[8:20, 10:24] = 1.0


@pytest.fixture(scope="module")
def emulated() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        yield rt


def captured_of(runtime: Runtime, path: Path, name: str = CAPTURED_MODEL) -> CapturedModel | None:
    """The CapturedModel kept with the cached model of ``path`` (None when there is none): the network
    call (``CAPTURED_MODEL``), the first-stage decode (``CAPTURED_DECODER``) or encode
    (``CAPTURED_ENCODER``)."""
    bundle = runtime.load_model(path)  # a cache hit: the model the tasks ran
    return runtime.cache.attachments(bundle).get(name)


def replays(captured: CapturedModel) -> int:
    """Replays of the network's graphs and of its companions' (the guided steps of
    :mod:`ldm_sdk.accel.guided_step`, which run the network inside)."""
    return captured.stats.replays + sum(c.stats.replays for c in captured.companions.values())


def guided_step(captured: CapturedModel) -> CapturedModel:
    """The one guided-step companion (the graphs of guided runs)."""
    (step,) = captured.companions.values()
    return step


def same(a: TaskResult, b: TaskResult) -> bool:
    assert a.latents is not None and b.latents is not None
    images = len(a.images) == len(b.images) and all(
        np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)
    )
    return images and torch.equal(a.latents, b.latents)


# -- the request flag ---------------------------------------------------------------------------------------
def test_flag_is_on_by_default_recorded_and_replayed(
    emulated: Runtime, model_files: dict[str, Path], tmp_path: Path
) -> None:
    assert TaskRequest().accelerate is True
    assert Txt2ImgRequest(prompt="a", accelerate=False).accelerate is False
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a cat", accelerate=False, **SMALL)
    result = get_task("txt2img")(request, emulated)
    assert result.manifest.request["accelerate"] is False
    fast = get_task("txt2img")(request.model_copy(update={"accelerate": True}), emulated)
    assert fast.manifest.request["accelerate"] is True
    for item in (result, fast):  # replay runs the recorded flag and reproduces the image exactly
        [path] = save_outputs(item, tmp_path / f"{item.manifest.request['accelerate']}.png")
        again = replay(path, emulated)
        assert again.manifest.request["accelerate"] is item.manifest.request["accelerate"]
        assert np.array_equal(again.images[0], read_image(path))


def test_cli_flag(model_files: dict[str, Path]) -> None:
    from ldm_sdk.cli import build_parser
    from ldm_sdk.commands.task_cli import common_fields

    argv = ["txt2img", "a cat", "--model", str(model_files["txt"])]
    assert common_fields(build_parser().parse_args(argv))["accelerate"] is True
    assert common_fields(build_parser().parse_args([*argv, "--no-accelerate"]))["accelerate"] is False


# -- the emulated fast path equals eager -------------------------------------------------------------------
RUNS: dict[str, tuple[str, str, dict[str, Any], bool]] = {
    # name: (task, model, request fields, needs image + mask)
    "txt2img-ddim-cfg": ("txt2img", "txt", {"prompt": "a boat", "batch": 2, "eta": 0.5, **SMALL}, False),
    "txt2img-plms-1": ("txt2img", "txt", {"prompt": "a", "sampler": "plms", "guidance": 1, **SMALL}, False),
    "class-dpmpp": ("class", "class", {"class_label": 1, "sampler": "dpmpp_2m", **SMALL}, False),
    "uncond-plms": ("uncond", "uncond", {"sampler": "plms", **SMALL}, False),
    "inpaint-model": ("inpaint", "ldm_inpaint", {"steps": 3, "sampler": "dpmpp_2m"}, True),
    "inpaint-blend": ("inpaint", "txt", {"prompt": "x", "steps": 3, "eta": 1.0}, True),
    "img2img": ("img2img", "txt", {"prompt": "x", "steps": 4, "strength": 0.6}, True),
}
REQUESTS = {
    "txt2img": Txt2ImgRequest,
    "class": ClassRequest,
    "uncond": UncondRequest,
    "inpaint": InpaintRequest,
    "img2img": Img2ImgRequest,
}


@pytest.mark.parametrize("name", list(RUNS))
def test_emulated_fast_path_equals_eager(
    emulated: Runtime, runtime: Runtime, model_files: dict[str, Path], name: str
) -> None:
    task_name, model, fields, needs_image = RUNS[name]
    task = get_task(task_name)
    request = REQUESTS[task_name](model=str(model_files[model]), seed=5, **fields)
    inputs = TaskInputs(image=IMAGE, mask=MASK if task_name == "inpaint" else None) if needs_image else None
    eager = task(request.model_copy(update={"accelerate": False}), emulated, inputs=inputs)
    captured = captured_of(emulated, model_files[model])
    before = replays(captured) if captured is not None else 0
    decoder = captured_of(emulated, model_files[model], CAPTURED_DECODER)
    decodes_before = decoder.stats.replays if decoder is not None else 0
    encoder = captured_of(emulated, model_files[model], CAPTURED_ENCODER)
    encodes_before = encoder.stats.replays if encoder is not None else 0
    fast = task(request, emulated, inputs=inputs)
    captured = captured_of(emulated, model_files[model])
    assert captured is not None and captured.mode == "emulate"
    assert replays(captured) > before, "the fast run went through the CapturedModel"
    decoder = captured_of(emulated, model_files[model], CAPTURED_DECODER)
    assert decoder is not None and decoder.mode == "emulate"
    assert decoder.stats.replays - decodes_before == len(fast.images), "each image decoded through it"
    # the runs that encode an image with the first stage: the input image, or the masked image the
    # inpainting model conditions on
    encodes = 1 if name in ("inpaint-blend", "img2img", "inpaint-model") else 0
    encoder = captured_of(emulated, model_files[model], CAPTURED_ENCODER)
    assert (encoder.stats.replays if encoder is not None else 0) - encodes_before == encodes, (
        "the input image encoded through the captured encoder"
    )
    assert same(fast, eager), f"{name}: the fast path changed the result"
    # and both equal the default CPU runtime, where nothing is captured
    assert same(task(request, runtime, inputs=inputs), eager)
    # the model's captured networks release each other's graphs when a capture runs out of memory
    members = [captured, *captured.companions.values(), decoder, *([encoder] if encoder is not None else [])]
    assert all(m._family is captured._family for m in members)
    family = captured._members()
    assert all(any(f is m for f in family) for m in members)


def test_models_on_one_device_release_each_others_graphs(model_files: dict[str, Path]) -> None:
    """A capture short of memory may release the graphs of every model the runtime keeps on its device:
    the captured networks of two cached models share one family."""
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        get_task("txt2img")(Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", **SMALL), rt)
        get_task("class")(ClassRequest(model=str(model_files["class"]), class_label=1, **SMALL), rt)
        txt = captured_of(rt, model_files["txt"])
        cls = captured_of(rt, model_files["class"])
        txt_decoder = captured_of(rt, model_files["txt"], CAPTURED_DECODER)
        assert txt is not None and cls is not None and txt_decoder is not None
        family = cls._members()
        assert all(any(f is m for f in family) for m in (txt, cls, txt_decoder, *txt.companions.values()))


def crowd(
    monkeypatch: pytest.MonkeyPatch, runtime: Runtime, *, first_stage: bool, always: bool = False
) -> None:
    """Captures of the UNet (``first_stage=False``) or of the first stage run out of GPU memory while
    another model is resident on the device (or ``always``), as a GPU holding two large models would."""
    capture = CapturedModel._capture

    def crowded(self: CapturedModel, *args: Any) -> Any:
        is_first_stage = getattr(self.fn, "__name__", "") in ("encode", "decode")
        if is_first_stage == first_stage and (always or len(runtime.cache.resident()) > 1):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test: another model is resident)")
        return capture(self, *args)

    monkeypatch.setattr(CapturedModel, "_capture", crowded)


@pytest.mark.parametrize("first_stage", [False, True], ids=["unet", "first-stage"])
def test_a_full_gpu_evicts_another_model_and_gives_the_same_result(
    model_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    first_stage: bool,
) -> None:
    """A capture that finds the device full after releasing every graph evicts the least recently used
    other model from the runtime's cache and tries again. The stochastic inpainting run (its masked
    denoiser draws noise before the network's first call) starts over from the same generator state, so the
    result equals the eager run's bit for bit."""
    request = InpaintRequest(model=str(model_files["txt"]), prompt="x", steps=3, eta=1.0, seed=5)
    inputs = TaskInputs(image=IMAGE, mask=MASK)
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        eager = get_task("inpaint")(request.model_copy(update={"accelerate": False}), rt, inputs=inputs)
        get_task("class")(ClassRequest(model=str(model_files["class"]), class_label=1, **SMALL), rt)
        other = rt.load_model(model_files["class"])
        assert len(rt.cache.resident()) == 2
        crowd(monkeypatch, rt, first_stage=first_stage)
        with caplog.at_level(logging.WARNING, logger="ldm_sdk.tasks"):
            fast = get_task("inpaint")(request, rt, inputs=inputs)
        assert same(fast, eager)
        assert rt.cache.resident() == [rt.model_key(model_files["txt"])], "the class model left"
        assert rt.load_model(model_files["class"]) is not other  # reloaded when asked for
        assert "evicted model" in caplog.text
        captured = captured_of(rt, model_files["txt"], CAPTURED_ENCODER if first_stage else CAPTURED_MODEL)
        assert captured is not None


def ddim_in_place(denoiser: Any, x: torch.Tensor, timesteps: torch.Tensor, **options: Any) -> torch.Tensor:
    """A plugin's sampler that changes its input in place (adds 1), then runs DDIM: a run started again
    must get the untouched starting state, not one with 1 added twice."""
    from ldm_sdk.samplers import ddim

    x.add_(1.0)
    return ddim.sample(denoiser, x, timesteps, **options)


class InPlaceSamplerPlugin:
    @hookimpl
    def ldm_register_samplers(self, registry: Any) -> None:
        registry.add("ddim_in_place", ddim_in_place)


def test_a_run_started_again_gets_the_untouched_starting_state(
    model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", sampler="ddim_in_place", **SMALL)
    plugins = [InPlaceSamplerPlugin()]
    with Runtime.create(
        load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate", plugins=plugins
    ) as rt:
        eager = get_task("txt2img")(request.model_copy(update={"accelerate": False}), rt)
        get_task("class")(ClassRequest(model=str(model_files["class"]), class_label=1, **SMALL), rt)
        crowd(monkeypatch, rt, first_stage=False)
        fast = get_task("txt2img")(request, rt)  # evicts the class model, samples again
        assert len(rt.cache.resident()) == 1
        assert same(fast, eager)


def test_a_full_gpu_with_nothing_left_to_evict_names_the_opt_out(
    model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", **SMALL)
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        get_task("class")(ClassRequest(model=str(model_files["class"]), class_label=1, **SMALL), rt)
        crowd(monkeypatch, rt, first_stage=False, always=True)
        with pytest.raises(TaskError, match=r"after evicting 1 other model.*accelerate=False"):
            get_task("txt2img")(request, rt)
        assert rt.cache.resident() == [rt.model_key(model_files["txt"])]
        monkeypatch.undo()  # the device has room again: the same runtime captures and runs
        eager = get_task("txt2img")(request.model_copy(update={"accelerate": False}), rt)
        assert same(get_task("txt2img")(request, rt), eager)


@pytest.mark.parametrize("name", list(RUNS))
def test_tasks_run_on_channels_last_models(model_files: dict[str, Path], name: str) -> None:
    """On CUDA in half precision the runtime makes every model channels_last at load
    (``prepare_cuda_inference``); the tasks' image, mask and latent code must take that layout. Here the
    cached model is converted by hand on the CPU and the result compared with the contiguous model's."""
    task_name, model, fields, needs_image = RUNS[name]
    task = get_task(task_name)
    request = REQUESTS[task_name](model=str(model_files[model]), seed=5, **fields)
    inputs = TaskInputs(image=IMAGE, mask=MASK if task_name == "inpaint" else None) if needs_image else None
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        plain = task(request, rt, inputs=inputs)
        rt.load_model(model_files[model]).to(memory_format=torch.channels_last)  # the cached model, in place
        assert any(
            p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last)
            for p in rt.load_model(model_files[model]).parameters()
        )
        converted = task(request, rt, inputs=inputs)
    assert plain.latents is not None and converted.latents is not None
    err = (converted.latents - plain.latents).abs().max() / plain.latents.abs().max()
    assert float(err) <= 1e-4, f"{name}: latents differ by {float(err):.2e}"
    for a, b in zip(converted.images, plain.images, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, name


# -- one CapturedModel per loaded model --------------------------------------------------------------------
def test_one_captured_model_per_model_reused_across_jobs(model_files: dict[str, Path]) -> None:
    txt2img = get_task("txt2img")
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a cat", **SMALL)
    with Runtime.create(load_entrypoints=False, device="cpu", capture_mode="emulate") as rt:
        first = txt2img(request, rt)
        captured = captured_of(rt, model_files["txt"])
        assert captured is not None
        step = guided_step(captured)  # guided: the whole step is one graph of the companion
        assert step.stats.captures == 1 and captured.stats.captures == 0
        steps = first.manifest.steps
        assert step.stats.replays == steps
        txt2img(request.model_copy(update={"seed": 9, "batch": 2}), rt)  # same signature: replayed
        assert captured_of(rt, model_files["txt"]) is captured and guided_step(captured) is step
        assert step.stats.captures == 1 and step.stats.replays == 3 * steps
        # another prompt, negative prompt and guidance scale: inputs of the same graph
        other = {"prompt": "a dog", "negative_prompt": "blur", "guidance": 3.0}
        txt2img(request.model_copy(update=other), rt)
        assert step.stats.captures == 1 and step.stats.replays == 4 * steps
        txt2img(request.model_copy(update={"accelerate": False}), rt)  # opted out: not used
        assert step.stats.replays == 4 * steps
        for size in (64, 96):  # new signatures: captured too; beyond TASK_MAX_GRAPHS the oldest goes
            txt2img(request.model_copy(update={"width": size, "height": size}), rt)
        assert captured_of(rt, model_files["txt"]) is captured
        assert step.stats.captures == 3 and len(step.signatures) == TASK_MAX_GRAPHS == 2
        assert step.stats.evictions == 1
        # kept beside the model, not in its bytes
        bundle = rt.load_model(model_files["txt"])
        assert rt.cache_stats().resident_bytes == module_nbytes(bundle)


def _gone(ref: weakref.ref[CapturedModel]) -> bool:
    gc.collect()  # an emulated capture's replay closure refers back to it (a graph capture's does not)
    return ref() is None


def test_captured_model_goes_with_its_model(model_files: dict[str, Path]) -> None:
    sizes = {name: module_nbytes(tiny_bundle(name)) for name in ("txt", "class")}
    budget = max(sizes.values()) + min(sizes.values()) // 2  # room for one model at a time
    txt = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a cat", **SMALL)
    cls = ClassRequest(model=str(model_files["class"]), class_label=1, **SMALL)
    with Runtime.create(
        load_entrypoints=False, device="cpu", capture_mode="emulate", memory_budget_bytes=budget
    ) as rt:
        get_task("txt2img")(txt, rt)
        txt_bundle = rt.load_model(model_files["txt"])
        captured = rt.cache.attachments(txt_bundle)[CAPTURED_MODEL]
        ref = weakref.ref(captured)
        del captured
        get_task("class")(cls, rt)  # the class model evicts the text model, and its graphs with it
        assert rt.cache.resident() == [rt.model_key(model_files["class"])]
        assert rt.cache.attachments(txt_bundle) == {}
        del txt_bundle
        assert _gone(ref), "the evicted model's CapturedModel is still referenced"
        class_ref = weakref.ref(rt.cache.attachments(rt.load_model(model_files["class"]))[CAPTURED_MODEL])
        rt.release()  # a host takes its memory back
        assert rt.cache.resident() == [] and _gone(class_ref)
        get_task("class")(cls, rt)  # reloaded: a new CapturedModel, captured again
        fresh = captured_of(rt, model_files["class"])
        assert fresh is not None
        assert fresh.stats.captures + sum(c.stats.captures for c in fresh.companions.values()) == 1


# -- when there is none -------------------------------------------------------------------------------------
def test_nothing_is_captured_on_cpu_by_default_or_when_off(
    runtime: Runtime, model_files: dict[str, Path]
) -> None:
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a cat", **SMALL)
    get_task("txt2img")(request, runtime)  # "auto" on the CPU: a capture would be a plain call
    assert captured_of(runtime, model_files["txt"]) is None
    with Runtime.create(load_entrypoints=False, device="cpu", capture_mode="off") as rt:
        get_task("txt2img")(request, rt)
        assert captured_of(rt, model_files["txt"]) is None
    with Runtime.create(load_entrypoints=False, device="cpu", capture_mode="emulate") as rt:
        get_task("txt2img")(request.model_copy(update={"accelerate": False}), rt)
        assert captured_of(rt, model_files["txt"]) is None


def test_a_model_given_in_memory_gets_one_for_the_run(
    emulated: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[CapturedModel | None] = []
    original = runner.captured_model

    def spy(bundle: ModelBundle, rt: Runtime) -> CapturedModel | None:
        made.append(original(bundle, rt))
        return made[-1]

    monkeypatch.setattr(runner, "captured_model", spy)
    bundle = tiny_bundle("txt")
    request = Txt2ImgRequest(prompt="a cat", batch=2, **SMALL)
    fast = get_task("txt2img")(request, emulated, inputs=TaskInputs(bundle=bundle))
    eager = get_task("txt2img")(
        request.model_copy(update={"accelerate": False}), emulated, inputs=TaskInputs(bundle=bundle)
    )
    assert same(fast, eager)
    [captured] = made  # one per run, shared by the batch items; none for the eager run
    assert captured is not None
    step = guided_step(captured)
    assert step.stats.captures == 1 and step.stats.replays == 2 * fast.manifest.steps
    assert emulated.cache.attachments(bundle) == {}  # not the cache's: it went with the run


def test_a_model_in_training_mode_runs_eagerly(emulated: Runtime) -> None:
    """A bundle built in memory without ``.eval()``: a graph would freeze its dropout, so it is not captured
    (the request still succeeds, eagerly)."""
    bundle = tiny_bundle("txt").train()
    assert runner.captured_model(bundle, emulated) is None
    request = Txt2ImgRequest(prompt="a cat", **SMALL)
    assert len(get_task("txt2img")(request, emulated, inputs=TaskInputs(bundle=bundle)).images) == 1


def test_a_model_that_cannot_be_captured_names_the_opt_out(
    emulated: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: CapturedModel, *args: object) -> None:
        raise CaptureError("fn synchronizes the host with the GPU (...)")

    monkeypatch.setattr(CapturedModel, "_capture", refuse)
    bundle = tiny_bundle("txt")
    request = Txt2ImgRequest(prompt="a cat", **SMALL)
    with pytest.raises(TaskError, match=r"synchronizes the host .* accelerate=False \(--no-accelerate\)"):
        get_task("txt2img")(request, emulated, inputs=TaskInputs(bundle=bundle))
    eager = request.model_copy(update={"accelerate": False})
    assert len(get_task("txt2img")(eager, emulated, inputs=TaskInputs(bundle=bundle)).images) == 1
