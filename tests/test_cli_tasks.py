"""The task commands of ``ldm-sdk``: outputs, manifests, replay, and one-line errors with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_sdk.cli import COMMANDS, main
from ldm_sdk.tasks.images import read_image
from ldm_sdk.tasks.manifest import read_manifest
from tests.tasks.tiny_models import CONFIGS, save_tiny

IMAGE = np.random.default_rng(7).integers(0, 256, (40, 36, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-tasks")
    out = {name: save_tiny(name, folder) for name in CONFIGS}
    Image.fromarray(IMAGE).save(folder / "photo.png")
    mask = np.zeros((40, 36), np.uint8)
    mask[10:22, 6:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    Image.fromarray(np.zeros((40, 36), np.uint8)).save(folder / "empty.png")
    Image.fromarray(np.full((40, 36), 255, np.uint8)).save(folder / "full.png")
    Image.fromarray(mask[:32, :32]).save(folder / "small_mask.png")
    (folder / "notes.png").write_text("this is not an image")
    out.update(
        photo=folder / "photo.png",
        mask=folder / "mask.png",
        empty=folder / "empty.png",
        full=folder / "full.png",
        small_mask=folder / "small_mask.png",
        notes=folder / "notes.png",
    )
    return out


def test_commands_registered() -> None:
    assert {"txt2img", "sample", "img2img", "inpaint", "outpaint", "replay"} <= set(COMMANDS)


def test_txt2img_batch_and_replay(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cat.png"
    argv = ["txt2img", "a cat", "--model", str(files["txt"]), "-W", "32", "-H", "32", "--steps", "3"]
    assert main([*argv, "--seed", "4", "--batch", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cat-0.png  (seed 4)" in printed and "cat-1.png  (seed 5)" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cat-0.json",
        "cat-0.png",
        "cat-1.json",
        "cat-1.png",
    ]
    single = tmp_path / "single.png"
    assert main([*argv, "--seed", "5", "-o", str(single), "--no-sidecar", "-q"]) == 0
    assert np.array_equal(read_image(single), read_image(tmp_path / "cat-1.png"))
    assert not (tmp_path / "single.json").exists()
    assert read_manifest(single).seeds == [5]

    again = tmp_path / "again.png"
    assert main(["replay", str(tmp_path / "cat-1.png"), "-o", str(again), "--check", "-q"]) == 0
    assert "identical to" in capsys.readouterr().out
    assert np.array_equal(read_image(again), read_image(single))
    assert main(["replay", str(tmp_path / "cat-0.json"), "-o", str(tmp_path / "from-json.png"), "-q"]) == 0
    assert np.array_equal(read_image(tmp_path / "from-json.png"), read_image(tmp_path / "cat-0.png"))


def test_folder_output(files: dict[str, Path], tmp_path: Path) -> None:
    argv = ["sample", "--model", str(files["class"]), "--class", "3", "-W", "32", "-H", "32", "--steps", "2"]
    assert main([*argv, "--batch", "2", "--seed", "0", "-o", str(tmp_path), "-q"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["class-0.png", "class-1.png"]
    assert (
        main(["sample", "--model", str(files["uncond"]), "--steps", "2", "-o", str(tmp_path / "u.png"), "-q"])
        == 0
    )
    assert read_image(tmp_path / "u.png").shape == (32, 32, 3)


def test_edit_commands(files: dict[str, Path], tmp_path: Path) -> None:
    common = ["--steps", "2", "--seed", "1", "-q"]
    inp = tmp_path / "inp.png"
    argv = [
        "inpaint",
        str(files["photo"]),
        str(files["mask"]),
        "--model",
        str(files["sd_inpaint"]),
        "-p",
        "a hat",
    ]
    assert main([*argv, "--pad", "--grow", "2", "--feather", "1", "-o", str(inp), *common]) == 0
    region = np.zeros((40, 36), bool)
    region[8:24, 4:22] = True  # the mask grown by 2
    assert np.array_equal(read_image(inp)[~region], IMAGE[~region])
    assert read_manifest(inp).extra["method"] == "model"

    out = tmp_path / "out.png"
    argv = [
        "outpaint",
        str(files["photo"]),
        "--model",
        str(files["txt"]),
        "-p",
        "sky",
        "--top",
        "8",
        "--right",
        "12",
    ]
    assert main([*argv, "--fill", "reflect", "-o", str(out), *common]) == 0
    assert np.array_equal(read_image(out)[8:, :36], IMAGE)

    i2i = tmp_path / "i2i.png"
    argv = ["img2img", str(files["photo"]), "--model", str(files["txt"]), "-p", "x", "--strength", "0.6"]
    assert main([*argv, "--crop", "-o", str(i2i), *common]) == 0
    assert read_image(i2i).shape == (32, 32, 3)
    assert main(["replay", str(i2i), "-o", str(tmp_path / "r.png"), "--check", "-q"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["txt2img", "a cat"], "no built-in default model yet: pass --model"),
        (["txt2img", "cat " * 20, "--model", "{txt}", "-W", "32", "-H", "32"], "prompt is 22 tokens"),
        (["txt2img", "a cat", "--model", "{txt}", "-W", "40", "-H", "32"], "width 40: use 32 or 48"),
        (["txt2img", "a cat", "--model", "{class}"], "cannot do 'txt2img'; it supports: class"),
        (
            ["txt2img", "a cat", "--model", "{txt}", "--steps", "0"],
            "steps: Input should be greater than or equal",
        ),
        (["sample", "--model", "{txt}"], "cannot do 'uncond'; it supports: txt2img"),
        (["img2img", "{notes}", "--model", "{txt}", "-p", "x"], "is not an image file"),
        (["img2img", "{photo}x", "--model", "{txt}", "-p", "x"], "image file not found"),
        (["img2img", "{photo}", "--model", "{txt}", "-p", "x"], "not a multiple of 16"),
        (["img2img", "{photo}", "--model", "{txt}", "-p", "x", "--strength", "0", "--pad"], "strength"),
        (
            ["inpaint", "{photo}", "{small_mask}", "--model", "{txt}", "-p", "x", "--pad"],
            "mask is 32x32 (WxH) but",
        ),
        (["inpaint", "{photo}", "{empty}", "--model", "{txt}", "-p", "x", "--pad"], "the mask is empty"),
        (["inpaint", "{photo}", "{full}", "--model", "{txt}", "-p", "x", "--pad"], "covers the whole image"),
        (["inpaint", "{photo}", "{notes}", "--model", "{txt}", "-p", "x", "--pad"], "mask "),
        (["inpaint", "{photo}", "{mask}", "--model", "{txt}", "--pad"], "is text-conditioned: give a prompt"),
        (
            ["outpaint", "{photo}", "--model", "{txt}", "-p", "x"],
            "at least one of left / right / top / bottom",
        ),
        (["txt2img", "a cat", "--model", "{txt}", "-o", "{tmp}/x.jpg"], "must be a .png file"),
    ],
)
def test_errors_exit_1_and_write_nothing(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    names = {k: str(v) for k, v in files.items()}
    args = [a.format(tmp=tmp_path, **names) for a in argv]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    assert main([*args, "--seed", "0", "--steps", "2", "-q"] if "--steps" not in args else [*args, "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ldm-sdk {args[0]}: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_process_exit_code_and_no_output(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    argv = [sys.executable, "-m", "ldm_sdk", "inpaint", str(files["photo"]), str(files["empty"])]
    proc = subprocess.run(
        [*argv, "--model", str(files["txt"]), "-p", "x", "--pad", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "the mask is empty" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_cancels_the_job_and_writes_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    import signal
    import time

    argv = [sys.executable, "-m", "ldm_sdk", "sample", "--model", str(files["uncond"]), "--sampler", "ddpm"]
    # SIGINT as in an interactive terminal: a test runner started in the background of a non-interactive
    # shell inherits SIGINT ignored, and so would the child (Python installs no handler then)
    proc = subprocess.Popen(
        [*argv, "--batch", "4", "-o", str(tmp_path / "x.png")],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(6)  # start-up, model load and a few of the 4000 steps
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "ldm-sdk sample: interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_together_batch_writes_images_that_replay_exactly(files: dict[str, Path], tmp_path: Path) -> None:
    """``--together``: each image's manifest replays its whole group and picks the image, bit for bit (the
    same image alone differs by rounding at the other batch size)."""
    argv = ["txt2img", "a cat", "--model", str(files["txt"]), "-W", "32", "-H", "32", "--steps", "3", "-q"]
    assert main([*argv, "--seed", "4", "--batch", "3", "--together", "-o", str(tmp_path / "cat.png")]) == 0
    manifest = read_manifest(tmp_path / "cat-2.png")
    assert manifest.request["batch_mode"] == "together" and manifest.extra["batch"]["groups"] == [3]
    assert manifest.item_request()["seed"] == 4 and manifest.item_request()["batch"] == 3
    assert manifest.item_in_request() == 2 and manifest.seeds == [6]
    again = tmp_path / "again.png"
    assert main(["replay", str(tmp_path / "cat-2.png"), "-o", str(again), "--check"]) == 0
    assert np.array_equal(read_image(again), read_image(tmp_path / "cat-2.png"))
    assert read_manifest(again).seeds == [6]
