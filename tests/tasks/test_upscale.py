"""The upscale task on a tiny random-weight LDM-SR model: x4 shapes, seeds, tiled vs whole, sizes, CLI.

Tiled vs whole (24x40 low-res input, 4 DDIM steps, 16x16-latent windows overlapping by 8, fp32 CPU):
the final latents differ by a relative L2 of 0.03-0.04 over seeds (0.02 with 24x24 windows; the causes are
GroupNorm statistics and zero padding per window, the tiny UNet has no attention) -- asserted below 0.1; the
uint8 images differ by 5-6 levels on average. A window that covers the whole latent is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_sdk import cli
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks.base import TaskError, TaskInputs, UnsupportedTaskError
from ldm_sdk.tasks.manifest import read_manifest, replay
from ldm_sdk.tasks.upscale import UpscaleRequest, upscale
from tests.tasks.tiny_large_models import save_tiny


@pytest.fixture(scope="module")
def sr_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("sr", tmp_path_factory.mktemp("sr"))


@pytest.fixture(scope="module")
def semantic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("semantic", tmp_path_factory.mktemp("semantic"))


@pytest.fixture
def lowres() -> np.ndarray:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((40, 24), Image.Resampling.BICUBIC))


def _up(sr_file: Path, runtime: Runtime, image: np.ndarray, **kw: object):  # type: ignore[no-untyped-def]
    request = UpscaleRequest(model=str(sr_file), steps=kw.pop("steps", 4), **kw)  # type: ignore[arg-type]
    return upscale(request, runtime, inputs=TaskInputs(image=image))


def _rel(a: np.ndarray | object, b: np.ndarray | object) -> float:
    import torch

    a_t, b_t = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return float((a_t - b_t).norm() / b_t.norm())


def test_output_is_four_times_the_input(sr_file: Path, runtime: Runtime, lowres: np.ndarray) -> None:
    result = _up(sr_file, runtime, lowres)
    (image,) = result.images
    assert image.shape == (96, 160, 3) and image.dtype == np.uint8
    assert result.latents is not None and tuple(result.latents.shape) == (1, 3, 24, 40)
    m = result.manifest
    assert m.task == "upscale" and m.extra["scale"] == 4
    assert m.extra["tiling"]["source"] == "whole"
    assert [r.role for r in m.inputs] == ["image"]


def test_seeds_are_deterministic_and_batch_items_are_single_runs(
    sr_file: Path, runtime: Runtime, lowres: np.ndarray
) -> None:
    a = _up(sr_file, runtime, lowres, seed=7)
    b = _up(sr_file, runtime, lowres, seed=7)
    c = _up(sr_file, runtime, lowres, seed=8)
    assert np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.images[0], c.images[0])
    batch = _up(sr_file, runtime, lowres, seed=7, batch=2)
    assert np.array_equal(batch.images[0], a.images[0]) and np.array_equal(batch.images[1], c.images[0])


def test_tiled_matches_whole_within_tolerance_and_one_window_exactly(
    sr_file: Path, runtime: Runtime, lowres: np.ndarray
) -> None:
    whole = _up(sr_file, runtime, lowres, seed=3)
    tiled = _up(sr_file, runtime, lowres, seed=3, tile=64, overlap=32)
    tiling = tiled.manifest.extra["tiling"]
    assert tiling["source"] == "request" and tiling["unet_tile"] == [16, 16] and tiling["unet_overlap"] == 8
    assert tiled.images[0].shape == whole.images[0].shape
    assert _rel(tiled.latents, whole.latents) < 0.1
    one = _up(sr_file, runtime, lowres, seed=3, tile=256)  # one window covers the 24x40 latent
    assert np.array_equal(one.images[0], whole.images[0])


def test_tiled_upscale_has_no_seams(sr_file: Path, runtime: Runtime, lowres: np.ndarray) -> None:
    tiled = _up(sr_file, runtime, lowres, seed=3, tile=64, overlap=32)
    img = tiled.images[0].astype(np.float64)
    steps = np.abs(np.diff(img, axis=1)).mean(axis=(0, 2))  # between column x and x + 1
    # window starts along the 40-wide latent: 0, 8, 16, 24 -> inner edges at latent 8..32, pixels x4
    edges = sorted({e for s in (0, 8, 16, 24) for e in (s, s + 16) if 0 < e < 40})
    border = np.zeros_like(steps, dtype=bool)
    border[[e * 4 - 1 for e in edges]] = True
    assert steps[border].max() <= steps[~border].max()


def test_a_memory_budget_tiles_automatically(sr_file: Path, runtime: Runtime, lowres: np.ndarray) -> None:
    # the estimate for the whole 24x40 latent is ~100 MiB (96 MiB size-independent): 98 MiB needs windows
    result = _up(sr_file, runtime, lowres, seed=3, memory_budget_mb=98)
    tiling = result.manifest.extra["tiling"]
    assert tiling["source"] == "budget" and tiling["budget_bytes"] == 98 * 2**20
    assert tiling["unet_tile"] is not None and all(v % 2 == 0 for v in tiling["unet_tile"])
    assert tiling["decode_tile"] is not None and tiling["decode_overlap"] <= min(tiling["decode_tile"]) // 2
    assert result.images[0].shape == (96, 160, 3)


def test_the_runtime_memory_budget_drives_the_plan(sr_file: Path, lowres: np.ndarray) -> None:
    budget = 110 * 2**20  # the decode estimate of the whole latent (~130 MiB) does not fit what is left
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", memory_budget_bytes=budget) as rt:
        result = _up(sr_file, rt, lowres, seed=3, steps=2)
        resident = rt.cache_stats().resident_bytes
    tiling = result.manifest.extra["tiling"]
    assert tiling["source"] == "budget" and tiling["budget_bytes"] == budget - resident
    assert tiling["decode_tile"] is not None
    with (
        Runtime.create(load_entrypoints=False, device="cpu", memory_budget_bytes=2**20) as rt,
        pytest.raises(TaskError, match=r"memory budget .* is used up by the loaded models"),
    ):
        _up(sr_file, rt, lowres)


def test_sizes_off_the_unet_multiple_need_pad_or_crop(sr_file: Path, runtime: Runtime) -> None:
    odd = np.random.default_rng(2).integers(0, 256, size=(21, 35, 3), dtype=np.uint8)
    with pytest.raises(TaskError, match=r"low-res image size 35x21 .* not a multiple of 2 .*--pad .*--crop"):
        _up(sr_file, runtime, odd)
    padded = _up(sr_file, runtime, odd, fit="pad", steps=2)
    assert padded.images[0].shape == (84, 140, 3)  # exactly 4x the input
    cropped = _up(sr_file, runtime, odd, fit="crop", steps=2)
    assert cropped.images[0].shape == (80, 136, 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"guidance": 3.0}, "no classifier-free guidance"),
        ({"tile": 60}, "tile 60 is not a multiple of 8 .* use 56 or 64"),
        ({"tile": 64, "overlap": 6}, "overlap 6 is not a multiple of the latent factor 4"),
        ({"tile": 32, "overlap": 32}, "overlap 32 is too large for tile 32"),
    ],
)
def test_bad_options_are_explained(
    sr_file: Path, runtime: Runtime, lowres: np.ndarray, options: dict[str, object], message: str
) -> None:
    with pytest.raises(TaskError, match=message):
        _up(sr_file, runtime, lowres, **options)


def test_a_model_that_is_not_super_resolution_is_refused(
    semantic_file: Path, runtime: Runtime, lowres: np.ndarray
) -> None:
    with pytest.raises(UnsupportedTaskError, match="cannot do 'upscale'; it supports: semantic"):
        _up(semantic_file, runtime, lowres)


def test_replay_reproduces_the_pixels(
    sr_file: Path, runtime: Runtime, lowres: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "low.png"
    Image.fromarray(lowres).save(path)
    request = UpscaleRequest(model=str(sr_file), steps=3, seed=5, tile=64, overlap=32, image=str(path))
    result = upscale(request, runtime)
    (out,) = result.save(tmp_path / "up.png")
    again = replay(read_manifest(out), runtime)
    assert np.array_equal(again.images[0], result.images[0])


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_upscale_writes_a_four_times_larger_png(
    commands: None, sr_file: Path, lowres: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "low.png"
    Image.fromarray(lowres).save(src)
    out = tmp_path / "big.png"
    argv = ["upscale", str(src), "--model", str(sr_file), "--steps", "2", "--seed", "1", "--tile", "64"]
    assert cli.main([*argv, "--overlap", "32", "--device", "cpu", "-q", "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (160, 96)
    assert "seed 1" in capsys.readouterr().out
    assert read_manifest(out).extra["tiling"]["unet_tile"] == [16, 16]


def test_cli_upscale_errors_are_one_line_and_write_nothing(
    commands: None, sr_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "odd.png"
    Image.fromarray(np.zeros((21, 35, 3), np.uint8)).save(src)
    out = tmp_path / "big.png"
    code = cli.main(["upscale", str(src), "--model", str(sr_file), "--steps", "1", "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ldm-sdk upscale: error: low-res image size 35x21") and "--pad" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_tiled_upscale_goes_through_one_capture_and_equals_eager(sr_file: Path, lowres: np.ndarray) -> None:
    """The fast path (emulated capture on the CPU) runs every window through the model's CapturedModel: one
    signature for all windows (they share the tile's size), and the result equals the eager tiled run."""
    from ldm_sdk.tasks.context import CAPTURED_MODEL

    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32", capture_mode="emulate") as rt:
        eager = _up(sr_file, rt, lowres, seed=3, tile=64, overlap=32, accelerate=False)
        fast = _up(sr_file, rt, lowres, seed=3, tile=64, overlap=32)
        captured = rt.cache.attachments(rt.load_model(sr_file))[CAPTURED_MODEL]
    assert fast.manifest.extra["tiling"]["unet_tile"] == [16, 16]
    assert captured.stats.captures == 1, captured.stats  # windows of one shape: one capture
    assert captured.stats.replays >= 4 * 2, captured.stats  # several windows per step, every step
    assert np.array_equal(fast.images[0], eager.images[0])
    assert fast.latents is not None and eager.latents is not None
    assert np.array_equal(np.asarray(fast.latents), np.asarray(eager.latents))
