"""Inpainting and outpainting: both methods, each tiny model kind, exact keep-regions, mask errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import get_task
from ldm_sdk.tasks.base import InpaintRequest, OutpaintRequest, TaskError, TaskInputs, UnsupportedTaskError
from ldm_sdk.tasks.masks import grow

inpaint, outpaint = get_task("inpaint"), get_task("outpaint")
IMAGE = np.random.default_rng(5).integers(0, 256, (40, 36, 3), dtype=np.uint8)
CONDITION = {
    "txt": {"prompt": "a dog"},
    "sd_inpaint": {"prompt": "a dog"},
    "ldm_inpaint": {},
    "class": {"class_label": 2},
    "uncond": {},
}
METHOD = {"txt": "blend", "sd_inpaint": "model", "ldm_inpaint": "model", "class": "blend", "uncond": "blend"}


def _mask() -> np.ndarray:
    m = np.zeros(IMAGE.shape[:2], np.float32)
    m[10:22, 6:20] = 1.0
    return m


@pytest.mark.parametrize("name", list(CONDITION))
@pytest.mark.parametrize(("grow_px", "feather"), [(0, 0.0), (3, 1.5)])
def test_inpaint_keeps_outside_exactly(
    runtime: Runtime, model_files: dict[str, Path], name: str, grow_px: int, feather: float
) -> None:
    request = InpaintRequest(
        model=str(model_files[name]), steps=3, fit="pad", grow=grow_px, feather=feather, **CONDITION[name]
    )
    r = inpaint(request, runtime, inputs=TaskInputs(image=IMAGE, mask=_mask()))
    out = r.images[0]
    region = grow(_mask() > 0.5, grow_px)
    assert out.shape == IMAGE.shape and out.dtype == np.uint8
    assert np.array_equal(out[~region], IMAGE[~region])
    assert not np.array_equal(out[region], IMAGE[region])
    assert r.manifest.extra["method"] == METHOD[name]
    assert r.manifest.extra["repainted_pixels"] == int(region.sum())


@pytest.mark.parametrize("name", ["txt", "sd_inpaint"])
def test_inpaint_seeds_and_batch(runtime: Runtime, model_files: dict[str, Path], name: str) -> None:
    base = {
        "model": str(model_files[name]),
        "steps": 3,
        "fit": "pad",
        "sampler": "euler_ancestral",
        **CONDITION[name],
    }
    inputs = TaskInputs(image=IMAGE, mask=_mask())
    a = inpaint(InpaintRequest(seed=4, **base), runtime, inputs=inputs)
    b = inpaint(InpaintRequest(seed=4, **base), runtime, inputs=inputs)
    c = inpaint(InpaintRequest(seed=5, **base), runtime, inputs=inputs)
    batch = inpaint(InpaintRequest(seed=3, batch=2, **base), runtime, inputs=inputs)
    assert np.array_equal(a.images[0], b.images[0]) and not np.array_equal(a.images[0], c.images[0])
    assert np.array_equal(batch.images[1], a.images[0])


def test_inpaint_crop_and_files(runtime: Runtime, model_files: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(IMAGE).save(tmp_path / "img.png")
    Image.fromarray((_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    request = InpaintRequest(
        model=str(model_files["txt"]),
        image=str(tmp_path / "img.png"),
        mask=str(tmp_path / "mask.png"),
        prompt="x",
        steps=2,
        fit="crop",
    )
    r = inpaint(request, runtime)
    region = _mask()[:32, :32] > 0.5
    assert r.images[0].shape == (32, 32, 3)
    assert np.array_equal(r.images[0][~region], IMAGE[:32, :32][~region])
    roles = {rec.role: rec for rec in r.manifest.inputs}
    assert roles["image"].path == str((tmp_path / "img.png").resolve()) and roles["image"].file_sha256
    assert roles["mask"].shape == [40, 36]


def test_inpaint_errors(runtime: Runtime, model_files: dict[str, Path]) -> None:
    txt = str(model_files["txt"])

    def run(mask: np.ndarray, **kw: object) -> None:
        fields = {"model": txt, "prompt": "x", "steps": 2, "fit": "pad", **kw}
        inpaint(InpaintRequest(**fields), runtime, inputs=TaskInputs(image=IMAGE, mask=mask))

    with pytest.raises(TaskError, match=r"mask is 32x32 \(WxH\) but the image is 36x40"):
        run(np.ones((32, 32), np.float32))
    with pytest.raises(TaskError, match="mask is empty"):
        run(np.zeros((40, 36), np.float32))
    with pytest.raises(TaskError, match="covers the whole image"):
        run(np.ones((40, 36), np.float32))
    with pytest.raises(TaskError, match="grown by 30 px, the mask covers the whole image"):
        run(_mask(), grow=30)
    with pytest.raises(UnsupportedTaskError, match="method 'model' needs a dedicated inpainting model"):
        run(_mask(), method="model")
    with pytest.raises(UnsupportedTaskError, match="cannot blend"):
        run(_mask(), model=str(model_files["sd_inpaint"]), method="blend")
    with pytest.raises(TaskError, match="is text-conditioned: give a prompt"):
        run(_mask(), prompt=None)
    with pytest.raises(TaskError, match="takes no prompt"):
        run(_mask(), model=str(model_files["ldm_inpaint"]))
    with pytest.raises(TaskError, match="has no condition to guide"):
        run(_mask(), model=str(model_files["ldm_inpaint"]), prompt=None, guidance=5.0)
    with pytest.raises(TaskError, match="needs a mask"):
        inpaint(InpaintRequest(model=txt, prompt="x"), runtime, inputs=TaskInputs(image=IMAGE))


@pytest.mark.parametrize("fill", ["edge", "reflect", "noise"])
@pytest.mark.parametrize("name", ["txt", "sd_inpaint", "ldm_inpaint"])
def test_outpaint_keeps_original_exactly(
    runtime: Runtime, model_files: dict[str, Path], name: str, fill: str
) -> None:
    request = OutpaintRequest(
        model=str(model_files[name]),
        steps=2,
        left=4,
        right=8,
        top=8,
        bottom=0,
        fill=fill,
        feather=1.0,
        **CONDITION[name],
    )
    r = outpaint(request, runtime, inputs=TaskInputs(image=IMAGE))
    out = r.images[0]
    assert out.shape == (48, 48, 3)
    assert np.array_equal(out[8:48, 4:40], IMAGE)
    assert not np.array_equal(out[:8], np.zeros_like(out[:8]))


def test_outpaint_fit_and_errors(runtime: Runtime, model_files: dict[str, Path]) -> None:
    txt = str(model_files["txt"])
    r = outpaint(
        OutpaintRequest(model=txt, prompt="x", steps=2, right=5, fit="pad"),
        runtime,
        inputs=TaskInputs(image=IMAGE),
    )
    assert r.images[0].shape == (40, 41, 3) and np.array_equal(r.images[0][:, :36], IMAGE)
    with pytest.raises(TaskError, match="at least one of left / right / top / bottom"):
        outpaint(OutpaintRequest(model=txt, prompt="x"), runtime, inputs=TaskInputs(image=IMAGE))
    with pytest.raises(TaskError, match="is not a multiple of 16"):
        outpaint(OutpaintRequest(model=txt, prompt="x", right=5), runtime, inputs=TaskInputs(image=IMAGE))
