"""``batch_mode="together"``: a batch sampled in groups of items, one sampler loop per group.

Each item draws the noise of its own single run (``ItemGenerators``), so the reference is the default
item-by-item run of the same request: together must equal it up to the rounding of the network at the
larger batch (these tiny fp32 CPU models: the final latents within 1e-4 of their largest magnitude, the
images within one level), and with the emulated capture bit for bit the eager together run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ldm_sdk.diffusion.noise import ItemGenerators
from ldm_sdk.hookspecs import hookimpl
from ldm_sdk.runtime import Runtime
from ldm_sdk.samplers import ddim
from ldm_sdk.tasks import get_task, runner
from ldm_sdk.tasks.base import (
    ClassRequest,
    Img2ImgRequest,
    InpaintRequest,
    TaskError,
    TaskInputs,
    TaskResult,
    Txt2ImgRequest,
)
from ldm_sdk.tasks.sampling import run_sampling
from tests.tasks.tiny_models import tiny_bundle

txt2img, class_cond, img2img, inpaint = (get_task(n) for n in ("txt2img", "class", "img2img", "inpaint"))
SMALL = {"width": 32, "height": 32, "steps": 4}
IMAGE = np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def assert_same_up_to_rounding(together: TaskResult, items: TaskResult) -> None:
    assert together.latents is not None and items.latents is not None
    err = float((together.latents - items.latents).abs().max() / items.latents.abs().max())
    assert err < 1e-4, err
    for a, b in zip(together.images, items.images, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("sampler", "extra"), [("ddim", {"eta": 0.7}), ("euler_ancestral", {}), ("dpmpp_2m", {}), ("plms", {})]
)
def test_txt2img_together_equals_items(
    runtime: Runtime, model_files: dict[str, Path], sampler: str, extra: dict[str, Any]
) -> None:
    base = {"model": str(model_files["txt"]), "prompt": "a boat", "sampler": sampler, "seed": 5, "batch": 3}
    items = txt2img(Txt2ImgRequest(**base, **SMALL, **extra), runtime)
    seen: list[tuple[int, int, int]] = []
    together = txt2img(
        Txt2ImgRequest(batch_mode="together", **base, **SMALL, **extra),
        runtime,
        callback=lambda info: seen.append((info.step, info.total, info.x.shape[0])),
    )
    assert_same_up_to_rounding(together, items)
    steps = together.manifest.steps
    assert seen == [(s, steps, 3) for s in range(steps)]  # one loop over the 3 items
    assert together.manifest.extra["batch"] == {"mode": "together", "groups": [3]}
    assert items.manifest.extra["batch"] == {"mode": "items", "groups": [1, 1, 1]}
    assert together.manifest.request["batch_mode"] == "together"


def test_groups_of_at_most_the_limit(
    runtime: Runtime, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "TOGETHER_MAX_ITEMS", 2)
    base = {"model": str(model_files["txt"]), "prompt": "a fox", "batch": 5, **SMALL}
    seen: list[tuple[int, int, int]] = []
    together = txt2img(
        Txt2ImgRequest(batch_mode="together", **base),
        runtime,
        callback=lambda info: seen.append((info.step, info.total, info.x.shape[0])),
    )
    assert together.manifest.extra["batch"]["groups"] == [2, 2, 1]
    steps = together.manifest.steps
    assert [s for s, _, _ in seen] == list(range(3 * steps)) and {t for _, t, _ in seen} == {3 * steps}
    assert [n for _, _, n in seen] == [2] * (2 * steps) + [1] * steps
    assert_same_up_to_rounding(together, txt2img(Txt2ImgRequest(**base), runtime))


def test_unguided_class_img2img_and_inpaint_together(runtime: Runtime, model_files: dict[str, Path]) -> None:
    """Batch-1 conditionings, init latents, known latents and masks serve every item of a group."""
    klass = {"model": str(model_files["class"]), "class_label": 3, "batch": 3, **SMALL}
    assert_same_up_to_rounding(
        class_cond(ClassRequest(batch_mode="together", **klass), runtime),
        class_cond(ClassRequest(**klass), runtime),
    )
    text = {"model": str(model_files["txt"]), "prompt": "a cat", "batch": 2, "steps": 6, "seed": 2}
    image = TaskInputs(image=IMAGE)
    assert_same_up_to_rounding(
        img2img(Img2ImgRequest(batch_mode="together", strength=0.6, **text), runtime, inputs=image),
        img2img(Img2ImgRequest(strength=0.6, **text), runtime, inputs=image),
    )
    mask = np.zeros((32, 32), np.float32)
    mask[8:20, 10:24] = 1.0
    masked = TaskInputs(image=IMAGE, mask=mask)
    together = inpaint(InpaintRequest(batch_mode="together", **text), runtime, inputs=masked)
    assert_same_up_to_rounding(together, inpaint(InpaintRequest(**text), runtime, inputs=masked))
    outside = mask < 0.5
    for img in together.images:  # the kept pixels are the input's, item for item
        assert np.array_equal(img[outside], IMAGE[outside])


def test_emulated_capture_equals_eager_together(model_files: dict[str, Path]) -> None:
    request = Txt2ImgRequest(
        model=str(model_files["txt"]), prompt="a boat", batch=3, batch_mode="together", **SMALL
    )
    out = {}
    for mode in ("emulate", "off"):
        with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode=mode) as rt:
            out[mode] = txt2img(request, rt)
    assert out["emulate"].latents is not None and out["off"].latents is not None
    assert torch.equal(out["emulate"].latents, out["off"].latents)


def ddim_copy(*args: Any, **kwargs: Any) -> torch.Tensor:
    """A plugin's sampler: DDIM under another name (a different function, no item_generators flag)."""
    return ddim.sample(*args, **kwargs)


def ddim_copy_flagged(*args: Any, **kwargs: Any) -> torch.Tensor:
    return ddim.sample(*args, **kwargs)


ddim_copy_flagged.item_generators = True  # type: ignore[attr-defined]


class SamplerPlugin:
    @hookimpl
    def ldm_register_samplers(self, registry: Any) -> None:
        registry.add("ddim_copy", ddim_copy)
        registry.add("ddim_flagged", ddim_copy_flagged)


@pytest.fixture(scope="module")
def with_plugin() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", plugins=[SamplerPlugin()]) as rt:
        yield rt


def test_plugin_samplers_batch_together_only_when_flagged(
    with_plugin: Runtime, model_files: dict[str, Path]
) -> None:
    base = {
        "model": str(model_files["txt"]),
        "prompt": "a boat",
        "batch": 2,
        "batch_mode": "together",
        **SMALL,
    }
    plain = txt2img(Txt2ImgRequest(sampler="ddim_copy", **base), with_plugin)
    assert plain.manifest.extra["batch"] == {
        "mode": "items",
        "groups": [1, 1],
        "why_items": "the ddim_copy sampler does not draw its noise per item",
    }
    flagged = txt2img(Txt2ImgRequest(sampler="ddim_flagged", **base), with_plugin)
    assert flagged.manifest.extra["batch"] == {"mode": "together", "groups": [2]}
    assert_same_up_to_rounding(flagged, plain)


def test_run_sampling_refuses_item_generators_for_an_unflagged_sampler(
    with_plugin: Runtime, model_files: dict[str, Path]
) -> None:
    from ldm_sdk.diffusion.conditioning import Conditioning

    bundle = tiny_bundle("uncond")
    generators = ItemGenerators(torch.Generator().manual_seed(s) for s in (0, 1))
    request = Txt2ImgRequest(prompt="unused", sampler="ddim_copy", steps=2)
    with pytest.raises(TaskError, match=r"does not draw its noise per batch item.*batch_mode 'items'"):
        run_sampling(
            bundle,
            Conditioning(),
            None,
            (2, bundle.latent_channels, 4, 4),
            request,
            generators,
            samplers=with_plugin.registries.samplers,
        )


def test_concat_maps_together_and_tiled_sampling_item_by_item(tmp_path: Path, runtime: Runtime) -> None:
    from ldm_sdk.tasks.semantic import SemanticRequest, semantic
    from tests.tasks.tiny_large_models import save_tiny

    model = save_tiny("semantic", tmp_path)
    ids = np.zeros((256, 384), np.int64)
    ids[:, 192:] = 2
    inputs = TaskInputs(extra={"semantic_map": ids})
    whole = SemanticRequest(model=str(model), steps=2, batch=2, batch_mode="together")
    together = semantic(whole, runtime, inputs=inputs)  # fits the model's window: sampled together
    assert together.manifest.extra["batch"] == {"mode": "together", "groups": [2]}
    assert_same_up_to_rounding(
        together, semantic(whole.model_copy(update={"batch_mode": "items"}), runtime, inputs=inputs)
    )
    request = SemanticRequest(model=str(model), steps=1, batch=2, batch_mode="together", tile=128, overlap=32)
    result = semantic(request, runtime, inputs=inputs)
    assert result.manifest.extra["tiling"]["unet_tile"] == [32, 32]
    assert result.manifest.extra["batch"] == {
        "mode": "items",
        "groups": [1, 1],
        "why_items": "tiled sampling runs item by item",
    }


def test_each_item_replays_its_group_exactly(
    runtime: Runtime, model_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ldm_sdk.tasks.manifest import replay

    monkeypatch.setattr(runner, "TOGETHER_MAX_ITEMS", 2)
    request = Txt2ImgRequest(
        model=str(model_files["txt"]), prompt="a fox", seed=10, batch=5, batch_mode="together", **SMALL
    )
    result = txt2img(request, runtime)
    items = [result.manifest.for_item(i) for i in range(5)]
    assert [m.item_request()["batch"] for m in items] == [2, 2, 2, 2, 1]
    assert [m.item_request()["seed"] for m in items] == [10, 10, 12, 12, 14]
    assert [m.item_in_request() for m in items] == [0, 1, 0, 1, 0]
    for i in (1, 3, 4):
        again = replay(items[i], runtime)
        assert len(again.images) == 1 and np.array_equal(again.images[0], result.images[i])
        assert again.manifest.seeds == [10 + i]
    broken = items[4].model_copy(update={"extra": {"batch": {"mode": "together", "groups": [2, 2]}}})
    with pytest.raises(TaskError, match=r"groups \[2, 2\] cover only 4 item\(s\)"):
        broken.item_request()
