"""Tasks on a CUDA device (mark ``gpu``): generators on the device, batch items equal single runs, replays
bit-exact in every dtype, and the CUDA-graph fast path (``accelerate``) equal to the eager run bit for bit.
Skipped without CUDA; run on the GPU machine and recorded in the report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import (
    ClassRequest,
    Img2ImgRequest,
    InpaintRequest,
    TaskError,
    TaskInputs,
    TaskResult,
    Txt2ImgRequest,
    UncondRequest,
)
from ldm_sdk.tasks.context import CAPTURED_DECODER, CAPTURED_ENCODER, CAPTURED_MODEL
from ldm_sdk.tasks.images import read_image, save_outputs
from ldm_sdk.tasks.manifest import replay
from tests.tasks.tiny_models import save_tiny

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gpu-models")
    return {name: save_tiny(name, folder) for name in ("class", "uncond", "ldm_inpaint", "txt")}


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cuda") as rt:
        yield rt


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_batches_and_replays(
    runtime: Runtime, files: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[10:40, 20:50] = 1
    runs = [
        (
            get_task("class"),
            ClassRequest(model=str(files["class"]), class_label=1, width=64, height=64),
            None,
        ),
        (get_task("uncond"), UncondRequest(model=str(files["uncond"]), sampler="euler_ancestral"), None),
        (
            get_task("inpaint"),
            InpaintRequest(model=str(files["ldm_inpaint"]), sampler="dpmpp_2m"),
            TaskInputs(image=image, mask=mask),
        ),
        (
            get_task("inpaint"),
            InpaintRequest(model=str(files["uncond"]), eta=1.0, feather=2.0),
            TaskInputs(image=image, mask=mask),
        ),
    ]
    for task, request, inputs in runs:
        request = request.model_copy(
            update={"device": "cuda", "dtype": dtype, "steps": 8, "seed": 3, "batch": 3}
        )
        try:
            batch = task(request, runtime, inputs=inputs)
        except TaskError as exc:
            if dtype != "fp16" or "non-finite" not in str(exc):
                raise
            print(f"{request.model}: {exc}")  # random tiny weights may overflow fp16: refused, not black
            continue
        assert batch.manifest.device == "cuda:0" and batch.manifest.dtype == dtype
        assert batch.latents is not None and batch.latents.device.type == "cuda"
        single = task(request.model_copy(update={"batch": 1, "seed": 4}), runtime, inputs=inputs)
        assert np.array_equal(batch.images[1], single.images[0]), (
            f"{task.name} {dtype}: batch item 1 != seed 4"
        )
        assert not np.array_equal(batch.images[0], batch.images[1])
        paths = save_outputs(batch, tmp_path / f"{task.name}-{dtype}.png")
        again = replay(paths[2], runtime, inputs=inputs)
        assert np.array_equal(again.images[0], read_image(paths[2])), f"{task.name} {dtype}: replay differs"
        if task.name == "inpaint":
            outside = mask < 0.5
            assert np.array_equal(batch.images[0][outside], image[outside])
    print(f"{torch.cuda.get_device_name()}: {dtype} batches equal single runs, replays bit-exact")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_graph_fast_path_equals_eager(runtime: Runtime, files: dict[str, Path], dtype: str) -> None:
    """txt2img through the model's captured CUDA graphs (``accelerate=True``, the default) equals the eager
    run (``accelerate=False``) bit for bit: guided DDIM (the batched [uncond; cond] call), and unguided PLMS
    and DPM++ 2M, which keep earlier model outputs (the captured call returns clones)."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    txt2img = get_task("txt2img")
    base = Txt2ImgRequest(
        model=str(files["txt"]), prompt="a red boat", width=64, height=64, steps=8, seed=3, batch=2
    ).model_copy(update={"device": "cuda", "dtype": dtype})
    runs = [
        base,
        base.model_copy(update={"sampler": "plms", "guidance": 1.0}),
        base.model_copy(update={"sampler": "dpmpp_2m", "guidance": 1.0}),
    ]

    def same(a: TaskResult, b: TaskResult) -> bool:
        assert a.latents is not None and b.latents is not None
        return torch.equal(a.latents, b.latents) and all(
            np.array_equal(x, y) for x, y in zip(a.images, b.images, strict=True)
        )

    for request in runs:
        try:
            eager = txt2img(request.model_copy(update={"accelerate": False}), runtime)
        except TaskError as exc:
            if dtype != "fp16" or "non-finite" not in str(exc):
                raise
            print(f"{request.sampler}: {exc}")  # random tiny weights may overflow fp16: refused, not black
            continue
        fast = txt2img(request, runtime)
        bundle = runtime.load_model(files["txt"], device="cuda", dtype=dtype)
        captured = runtime.cache.attachments(bundle)[CAPTURED_MODEL]
        # guided: the whole step is the graph of the model's guided-step companion; unguided: the network's
        graphs = [captured, *captured.companions.values()]
        assert captured.mode == "auto" and all(g.stats.passthrough == 0 for g in graphs), graphs
        assert sum(g.stats.captures for g in graphs) >= 1, graphs
        replays = sum(g.stats.replays for g in graphs)
        assert replays > 0, graphs
        assert same(fast, eager), f"{request.sampler} {dtype}: captured replay differs from eager"
        again = txt2img(request, runtime)  # the graphs captured by the first run, replayed
        assert sum(g.stats.replays for g in graphs) > replays and same(again, eager)
        assert fast.manifest.request["accelerate"] is True and eager.manifest.request["accelerate"] is False
    print(f"{torch.cuda.get_device_name()}: {dtype} txt2img through CUDA graphs equals eager")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_first_stage_captured_equals_eager(runtime: Runtime, files: dict[str, Path], dtype: str) -> None:
    """img2img and blend inpainting encode their input image, the LDM inpainting model its masked image,
    and all decode the result through the first stage's captured CUDA graphs; from the first call on (the
    capture) through the replays every run equals the eager run bit for bit."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[10:40, 20:50] = 1
    inputs = TaskInputs(image=image, mask=mask)
    fields = {"model": str(files["txt"]), "prompt": "a red boat", "steps": 6, "seed": 3}
    runs = [
        (get_task("img2img"), Img2ImgRequest(**fields, strength=0.6)),
        (get_task("inpaint"), InpaintRequest(**fields, feather=2.0)),
        # the LDM inpainting model (VQ-f4, concat): the masked image through the captured encoder
        (
            get_task("inpaint"),
            InpaintRequest(**{**fields, "model": str(files["ldm_inpaint"]), "prompt": None}),
        ),
    ]
    ran: set[str | None] = set()
    for task, request in runs:
        request = request.model_copy(update={"device": "cuda", "dtype": dtype})
        try:
            eager = task(request.model_copy(update={"accelerate": False}), runtime, inputs=inputs)
        except TaskError as exc:
            if dtype != "fp16" or "non-finite" not in str(exc):
                raise
            print(f"{task.name}: {exc}")  # random tiny weights may overflow fp16: refused, not black
            continue
        assert eager.latents is not None
        ran.add(request.model)
        for _ in range(3):  # the capture, then replays
            fast = task(request, runtime, inputs=inputs)
            assert fast.latents is not None and torch.equal(fast.latents, eager.latents), (
                f"{task.name} {dtype}: the fast path differs from eager"
            )
            assert np.array_equal(fast.images[0], eager.images[0]), f"{task.name} {dtype}: images differ"
    assert str(files["txt"]) in ran, "nothing ran"
    for model in [m for m in ("txt", "ldm_inpaint") if str(files[m]) in ran]:
        attachments = runtime.cache.attachments(runtime.load_model(files[model], device="cuda", dtype=dtype))
        for name in (CAPTURED_ENCODER, CAPTURED_DECODER):
            stats = attachments[name].stats
            assert stats.captures >= 1 and stats.replays >= 1 and stats.passthrough == 0, (model, name, stats)
    print(f"{torch.cuda.get_device_name()}: {dtype} first stage captured (encode, decode) equals eager")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_batch_sampled_together(
    runtime: Runtime, files: dict[str, Path], tmp_path: Path, dtype: str
) -> None:
    """``batch_mode="together"`` on CUDA: per-item generators on the device, the captured path equal to the
    eager one bit for bit, every item close to its item-by-item run (the network's rounding at the larger
    batch), and each image's replay (its group) bit-exact."""
    txt2img = get_task("txt2img")
    request = Txt2ImgRequest(
        model=str(files["txt"]), prompt="a red boat", width=64, height=64, steps=8, seed=3, batch=3
    ).model_copy(update={"device": "cuda", "dtype": dtype, "batch_mode": "together"})
    try:
        items = txt2img(request.model_copy(update={"batch_mode": "items"}), runtime)
    except TaskError as exc:
        if dtype != "fp16" or "non-finite" not in str(exc):
            raise
        pytest.skip(f"random tiny weights overflow fp16: {exc}")
    together = txt2img(request, runtime)
    eager = txt2img(request.model_copy(update={"accelerate": False}), runtime)
    assert together.manifest.extra["batch"] == {"mode": "together", "groups": [3]}
    assert together.latents is not None and eager.latents is not None and items.latents is not None
    assert torch.equal(together.latents, eager.latents), f"{dtype}: captured together differs from eager"
    err = float((together.latents - items.latents).abs().max() / items.latents.abs().max())
    # torch lets cuDNN run float32 convolutions in TF32 by default (a 10-bit mantissa, unit roundoff 2^-11),
    # and the algorithm it picks depends on the batch: with TF32 on, "the network's rounding" is TF32's.
    tf32 = torch.backends.cudnn.allow_tf32
    assert err < (3e-2 if dtype != "fp32" else 4e-3 if tf32 else 1e-4), (err, f"cudnn.allow_tf32={tf32}")
    paths = save_outputs(together, tmp_path / f"together-{dtype}.png")
    again = replay(paths[1], runtime)
    assert np.array_equal(again.images[0], read_image(paths[1])), (
        f"{dtype}: replay of a together item differs"
    )
    print(
        f"{torch.cuda.get_device_name()}: {dtype} together vs items {err:.2e}; captured = eager; replay exact"
    )
