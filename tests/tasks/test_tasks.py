"""Every task end to end on tiny random-weight models (CPU): shapes, seeds, batches, callbacks, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_sdk.jobs import Job
from ldm_sdk.runtime import Runtime
from ldm_sdk.samplers.base import SamplingCancelled, StepInfo
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import (
    ClassRequest,
    Img2ImgRequest,
    NoDefaultModelError,
    TaskError,
    TaskInputs,
    TaskResult,
    Txt2ImgRequest,
    UncondRequest,
    UnsupportedTaskError,
    submit_task,
)
from ldm_sdk.tasks.context import supported_tasks
from tests.tasks.tiny_models import tiny_bundle

txt2img, class_cond, uncond = get_task("txt2img"), get_task("class"), get_task("uncond")
img2img, inpaint, outpaint = get_task("img2img"), get_task("inpaint"), get_task("outpaint")
SMALL = {"width": 32, "height": 32, "steps": 3}


def _mask(h: int = 32, w: int = 32) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[8:20, 10:24] = 1.0
    return m


# -- generating from noise ----------------------------------------------------------------------------
def test_txt2img_shapes_and_manifest(runtime: Runtime, model_files: dict[str, Path]) -> None:
    r = txt2img(Txt2ImgRequest(model=str(model_files["txt"]), prompt="a red cat", batch=2, **SMALL), runtime)
    assert len(r.images) == 2 and all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in r.images)
    assert r.latents is not None and r.latents.shape == (2, 4, 4, 4)
    assert not np.array_equal(r.images[0], r.images[1])
    m = r.manifest
    assert m.task == "txt2img" and m.seeds == [0, 1] and m.guidance == 7.5 and m.sampler == "ddim"
    assert m.steps == 3 and m.spacing == "uniform" and m.device == "cpu" and m.dtype == "fp32"
    assert m.model.sha256 is not None and m.model.family == "tiny-txt2img-bert"
    assert m.request["prompt"] == "a red cat" and m.versions["torch"] == torch.__version__
    assert [p.name for p in m.plugins] == ["builtin"]


@pytest.mark.parametrize(
    ("sampler", "extra"),
    [("ddim", {"eta": 0.7}), ("euler_ancestral", {}), ("dpmpp_2m", {}), ("plms", {})],
)
def test_seeds_and_batches(runtime: Runtime, model_files: dict[str, Path], sampler: str, extra: dict) -> None:
    base = {"model": str(model_files["txt"]), "prompt": "a boat", "sampler": sampler, **SMALL, **extra}
    a = txt2img(Txt2ImgRequest(seed=11, **base), runtime)
    b = txt2img(Txt2ImgRequest(seed=11, **base), runtime)
    c = txt2img(Txt2ImgRequest(seed=12, **base), runtime)
    assert np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.images[0], c.images[0])
    batch = txt2img(Txt2ImgRequest(seed=10, batch=3, **base), runtime)
    assert np.array_equal(batch.images[1], a.images[0]) and np.array_equal(batch.images[2], c.images[0])
    assert batch.latents is not None and a.latents is not None
    assert torch.equal(batch.latents[1:2], a.latents)


def test_txt2img_errors(runtime: Runtime, model_files: dict[str, Path]) -> None:
    with pytest.raises(TaskError, match="prompt is 20 tokens; this encoder takes at most 16"):
        txt2img(Txt2ImgRequest(model=str(model_files["txt"]), prompt="cat " * 18, **SMALL), runtime)
    with pytest.raises(NoDefaultModelError, match="no built-in default model yet: pass --model"):
        txt2img(Txt2ImgRequest(prompt="a cat"), runtime)
    with pytest.raises(TaskError, match="model not found"):
        txt2img(Txt2ImgRequest(model="/nonexistent.safetensors", prompt="a cat"), runtime)
    with pytest.raises(TaskError, match="width 24: use 16 or 32"):
        txt2img(Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", width=24, height=32), runtime)
    with pytest.raises(UnsupportedTaskError, match=r"cannot do 'txt2img'; it supports: class, img2img"):
        txt2img(Txt2ImgRequest(model=str(model_files["class"]), prompt="a cat", **SMALL), runtime)
    with pytest.raises(UnsupportedTaskError, match="it supports: inpaint, outpaint"):
        txt2img(Txt2ImgRequest(model=str(model_files["sd_inpaint"]), prompt="a cat", **SMALL), runtime)


def test_given_bundle_equals_file(runtime: Runtime, model_files: dict[str, Path]) -> None:
    request = Txt2ImgRequest(prompt="a cat", **SMALL)
    from_file = txt2img(request.model_copy(update={"model": str(model_files["txt"])}), runtime)
    in_memory = txt2img(request, runtime, inputs=TaskInputs(bundle=tiny_bundle("txt")))
    assert np.array_equal(from_file.images[0], in_memory.images[0])
    assert in_memory.manifest.model.sha256 is None  # built in memory: nothing to hash
    with pytest.raises(TaskError, match="the request asks for dtype 'bf16'"):
        txt2img(
            request.model_copy(update={"dtype": "bf16"}),
            runtime,
            inputs=TaskInputs(bundle=tiny_bundle("txt")),
        )


def test_class_conditional(runtime: Runtime, model_files: dict[str, Path]) -> None:
    model = str(model_files["class"])
    r = class_cond(ClassRequest(model=model, class_label=3, batch=2, **SMALL), runtime)
    assert [i.shape for i in r.images] == [(32, 32, 3)] * 2 and r.manifest.guidance == 1.0
    other = class_cond(ClassRequest(model=model, class_label=4, **SMALL), runtime)
    assert not np.array_equal(r.images[0], other.images[0])
    guided = class_cond(
        ClassRequest(model=model, class_label=3, guidance=3.0, uncond_class=9, **SMALL), runtime
    )
    assert guided.manifest.guidance == 3.0 and not np.array_equal(guided.images[0], r.images[0])
    with pytest.raises(TaskError, match="needs the model's unconditional \\(null\\) class label"):
        class_cond(ClassRequest(model=model, class_label=3, guidance=3.0, **SMALL), runtime)
    with pytest.raises(TaskError, match=r"class label 10 out of range; valid: 0\.\.9"):
        class_cond(ClassRequest(model=model, class_label=10, **SMALL), runtime)
    with pytest.raises(UnsupportedTaskError, match="cannot do 'class'"):
        class_cond(ClassRequest(model=str(model_files["txt"]), class_label=1, **SMALL), runtime)


def test_unconditional(runtime: Runtime, model_files: dict[str, Path]) -> None:
    model = str(model_files["uncond"])
    r = uncond(UncondRequest(model=model, sampler="dpmpp_2m", **SMALL), runtime)
    assert r.images[0].shape == (32, 32, 3) and r.manifest.spacing == "karras"
    default = uncond(UncondRequest(model=model, steps=2), runtime)
    assert default.images[0].shape == (32, 32, 3)  # the model's training size: 8 latents x factor 4
    with pytest.raises(TaskError, match="no condition to guide"):
        uncond(UncondRequest(model=model, guidance=2.0, **SMALL), runtime)
    with pytest.raises(UnsupportedTaskError, match="cannot do 'uncond'; it supports: txt2img"):
        uncond(UncondRequest(model=str(model_files["txt"]), **SMALL), runtime)


def test_ddpm_runs_all_steps(runtime: Runtime, model_files: dict[str, Path]) -> None:
    seen: list[int] = []
    r = uncond(
        UncondRequest(model=str(model_files["uncond"]), sampler="ddpm", width=16, height=16),
        runtime,
        callback=lambda info: seen.append(info.step),
    )
    assert r.manifest.steps == 1000 and seen == list(range(1000))


def test_supported_tasks(runtime: Runtime) -> None:
    registry = runtime.registries.condition_encoders
    got = {
        name: supported_tasks(tiny_bundle(name), registry) for name in ("txt", "sd_inpaint", "ldm_inpaint")
    }
    assert got == {
        "txt": ("txt2img", "img2img", "inpaint", "outpaint"),
        "sd_inpaint": ("inpaint", "outpaint"),
        "ldm_inpaint": ("inpaint", "outpaint"),
    }
    assert supported_tasks(tiny_bundle("class"), registry) == ("class", "img2img", "inpaint", "outpaint")
    assert supported_tasks(tiny_bundle("uncond"), registry) == ("uncond", "img2img", "inpaint", "outpaint")


# -- callbacks and jobs --------------------------------------------------------------------------------------
def test_callback_counts_over_the_batch_and_cancels(runtime: Runtime, model_files: dict[str, Path]) -> None:
    steps: list[tuple[int, int]] = []
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", batch=2, **SMALL)
    txt2img(request, runtime, callback=lambda info: steps.append((info.step, info.total)))
    assert steps == [(i, 6) for i in range(6)]

    def stop(info: StepInfo) -> None:
        if info.step == 1:
            raise SamplingCancelled

    with pytest.raises(SamplingCancelled):
        txt2img(request, runtime, callback=stop)


def test_submit_task_as_job(runtime: Runtime, model_files: dict[str, Path]) -> None:
    from ldm_sdk.jobs import JobCancelledError, JobProgress, JobStatus

    events: list[object] = []
    unsubscribe = runtime.subscribe(events.append)
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", **SMALL)
    job = submit_task(txt2img, request, runtime)
    direct = txt2img(request, runtime)
    assert np.array_equal(job.result(timeout=60).images[0], direct.images[0])
    assert [e.step for e in events if isinstance(e, JobProgress) and e.job_id == job.id] == [1, 2, 3]

    submitted = threading.Event()
    holder: dict[str, Job[TaskResult]] = {}

    def cancel(info: StepInfo) -> None:
        submitted.wait(10)
        holder["job"].cancel()

    cancelled = holder["job"] = submit_task(txt2img, request, runtime, callback=cancel)
    submitted.set()
    with pytest.raises(JobCancelledError):
        cancelled.result(timeout=60)
    assert cancelled.status == JobStatus.CANCELLED
    unsubscribe()


# -- img2img ----------------------------------------------------------------------------------------------
def test_img2img(runtime: Runtime, model_files: dict[str, Path]) -> None:
    image = np.random.default_rng(3).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    base = {"model": str(model_files["txt"]), "prompt": "a cat", "steps": 10}
    seen: list[int] = []
    r = img2img(
        Img2ImgRequest(fit="pad", strength=0.5, **base),
        runtime,
        inputs=TaskInputs(image=image),
        callback=lambda info: seen.append(info.step),
    )
    assert r.images[0].shape == (40, 36, 3) and len(seen) == 5  # int(0.5 * 10) steps
    again = img2img(Img2ImgRequest(fit="pad", strength=0.5, **base), runtime, inputs=TaskInputs(image=image))
    other = img2img(
        Img2ImgRequest(fit="pad", strength=0.5, seed=1, **base), runtime, inputs=TaskInputs(image=image)
    )
    assert np.array_equal(r.images[0], again.images[0]) and not np.array_equal(r.images[0], other.images[0])
    cropped = img2img(
        Img2ImgRequest(fit="crop", strength=1.0, **base), runtime, inputs=TaskInputs(image=image)
    )
    assert cropped.images[0].shape == (32, 32, 3)
    with pytest.raises(TaskError, match=r"not a multiple of 16.*--pad"):
        img2img(Img2ImgRequest(**base), runtime, inputs=TaskInputs(image=image))
    with pytest.raises(TaskError, match="is text-conditioned: give a prompt"):
        img2img(Img2ImgRequest(model=base["model"], fit="pad"), runtime, inputs=TaskInputs(image=image))
    with pytest.raises(TaskError, match="needs an input image"):
        img2img(Img2ImgRequest(**base), runtime)
    klass = img2img(
        Img2ImgRequest(model=str(model_files["class"]), class_label=2, steps=4, fit="pad"),
        runtime,
        inputs=TaskInputs(image=image),
    )
    assert klass.images[0].shape == (40, 36, 3)
    with pytest.raises(TaskError, match=r"is not text-conditioned .*takes no prompt"):
        img2img(
            Img2ImgRequest(model=str(model_files["class"]), class_label=2, prompt="x", fit="pad"),
            runtime,
            inputs=TaskInputs(image=image),
        )


def test_task_objects_and_sampler_options(runtime: Runtime, model_files: dict[str, Path]) -> None:
    from ldm_sdk.registry import Registry
    from ldm_sdk.tasks import BUILTIN_TASKS, register_builtin_tasks
    from ldm_sdk.tasks.base import Task

    for name in ("txt2img", "class", "uncond", "img2img", "inpaint", "outpaint"):
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and task.request_type.task == name
    registry: Registry[object] = Registry("task")
    register_builtin_tasks(registry)
    assert set(registry.names()) <= set(BUILTIN_TASKS) and "inpaint" in registry
    with pytest.raises(TaskError, match="unknown task 'paint'"):
        get_task("paint")
    with pytest.raises(TaskError, match="the plms sampler takes no eta"):
        request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a", sampler="plms", eta=0.5, **SMALL)
        txt2img(request, runtime)
    with pytest.raises(TypeError, match="txt2img takes a Txt2ImgRequest"):
        txt2img(UncondRequest(), runtime)  # type: ignore[arg-type]


def test_given_encoder_replaces_the_cond_stage(runtime: Runtime, model_files: dict[str, Path]) -> None:
    from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder
    from tests.tasks.tiny_models import BERT_PARAMS

    bundle = tiny_bundle("txt")
    same = BERTEmbedder(**BERT_PARAMS).eval()  # type: ignore[arg-type]
    same.load_state_dict(bundle.cond_stage_weights)
    other = BERTEmbedder(**BERT_PARAMS).eval()  # type: ignore[arg-type]
    request = Txt2ImgRequest(model=str(model_files["txt"]), prompt="a cat", **SMALL)
    default = txt2img(request, runtime)
    with_same = txt2img(request, runtime, inputs=TaskInputs(encoder=same))
    with_other = txt2img(request, runtime, inputs=TaskInputs(encoder=other))
    assert np.array_equal(with_same.images[0], default.images[0])
    assert not np.array_equal(with_other.images[0], default.images[0])


def test_prompts_are_encoded_once_per_runtime(model_files: dict[str, Path]) -> None:
    """A repeated prompt and the negative prompt go through the encoder once; the images equal those of a
    runtime that encodes every time (prompt cache off)."""
    from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder
    from tests.tasks.tiny_models import BERT_PARAMS

    encoder = BERTEmbedder(**BERT_PARAMS).eval()  # type: ignore[arg-type]
    encoder.load_state_dict(tiny_bundle("txt").cond_stage_weights)
    prompts: list[list[str]] = []
    encoder.register_forward_pre_hook(lambda _m, args: prompts.append(list(args[0])))
    base = {"model": str(model_files["txt"]), **SMALL}
    inputs = TaskInputs(encoder=encoder)
    runs = [("a red cat", 1), ("a red cat", 2), ("a blue cat", 3)]
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as cached:
        got = [txt2img(Txt2ImgRequest(prompt=p, seed=s, **base), cached, inputs=inputs) for p, s in runs]
        assert prompts == [["a red cat"], [""], ["a blue cat"]]
        stats = cached.prompt_cache.stats()
        assert (stats.hits, stats.misses) == (3, 3)
        with torch.no_grad():  # new weights: encoded afresh
            next(encoder.parameters()).mul_(0.5)
        txt2img(Txt2ImgRequest(prompt="a red cat", **base), cached, inputs=inputs)
        assert prompts[3:] == [["a red cat"], [""]]
        with torch.no_grad():
            next(encoder.parameters()).mul_(2.0)  # back, exactly
    prompts.clear()
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", prompt_cache_size=0) as plain:
        ref = [txt2img(Txt2ImgRequest(prompt=p, seed=s, **base), plain, inputs=inputs) for p, s in runs]
        assert len(prompts) == 6
    for a, b in zip(got, ref, strict=True):
        assert np.array_equal(a.images[0], b.images[0])
