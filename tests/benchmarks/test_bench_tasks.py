"""``ldm-sdk bench-tasks`` / :mod:`ldm_sdk.benchmarks.tasks` on the tiny random-weight task models (CPU,
2 steps): which tasks are timed, the timings and images of each, the JSON file, and the errors.

Expectations come from outside the benchmark: the tasks a model supports (``supported_tasks`` on the model
loaded independently), the sizes asked for, the tiny models' documented size multiples and latent factors,
and the messages the task commands themselves print."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldm_sdk.benchmarks.tasks import BenchOptions, BenchReport, run
from ldm_sdk.cli import COMMANDS, build_parser, main
from ldm_sdk.commands.bench_tasks import parse_size, parse_tasks
from ldm_sdk.runtime import Runtime
from ldm_sdk.tasks import BUILTIN_TASKS
from ldm_sdk.tasks.base import NoDefaultModelError, TaskError, TaskRequest, UnsupportedTaskError
from ldm_sdk.tasks.context import load_bundle, supported_tasks
from tests.tasks import tiny_large_models, tiny_models

# tiny models: size multiple = latent factor x 2 ** (UNet levels - 1)
TXT_MULTIPLE = 16  # KL-f8, two levels
F4_MULTIPLE = 8  # VQ-f4 / KL-f4, two levels
F4 = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench-tasks")
    out = {name: tiny_models.save_tiny(name, folder) for name in ("txt", "ldm_inpaint", "class", "uncond")}
    out.update({name: tiny_large_models.save_tiny(name, folder) for name in tiny_large_models.CONFIGS})
    return out


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as rt:
        yield rt


@pytest.fixture
def no_entrypoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDM_SDK_NO_ENTRYPOINTS", "1")


def supported(model: Path) -> tuple[str, ...]:
    """The model's tasks, from the model loaded in a runtime of its own."""
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as rt:
        bundle = load_bundle(TaskRequest(model=str(model)), rt)
        return supported_tasks(bundle, rt.registries.condition_encoders)


def check_timings(report: BenchReport, repeats: int) -> None:
    for t in report.tasks:
        assert len(t.warm_s) == repeats and all(s > 0 for s in t.warm_s), t.task
        assert t.first_run_s > 0 and 0 < t.min_s <= t.median_s <= max(t.warm_s), t.task
        assert t.s_per_image == pytest.approx(t.median_s) and t.batch == 1
        assert t.steps == 2 and t.request["steps"] == 2 and t.request["seed"] == 0


# -- the command, end to end --------------------------------------------------------------------------------
def test_txt2img_model_times_its_supported_tasks_and_writes_json(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_entrypoints: None
) -> None:
    out = tmp_path / "bt.json"
    argv = ["bench-tasks", "--model", str(files["txt"]), "--steps", "2", "--repeats", "2"]
    assert main([*argv, "--size", "48x32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    expected = supported(files["txt"])
    assert expected == ("txt2img", "img2img", "inpaint", "outpaint")
    assert [t["task"] for t in data["tasks"]] == list(expected)
    for name in expected:
        assert name in printed
    assert data["size"] == [32, 48] and data["device"] == "cpu" and data["dtype"] == "fp32"
    assert data["steps"] == 2 and data["repeats"] == 2 and data["load_s"] > 0
    assert data["cache"]["loads"] == 1 and data["cache"]["evictions"] == 0  # one load, reused by every task
    # one prompt, one negative prompt: encoded in the first run, reused by the 4 x 3 - 1 later runs
    assert data["prompt_cache"] == {"capacity": 32, "hits": 2 * 11, "misses": 2}
    assert "prompt cache on (32 prompts): 22 encoding(s) reused, 2 computed" in printed
    for key in ("torch", "device_name", "cpu_threads", "load_avg_1_5_15", "date"):
        assert key in data["env"]
    for t in data["tasks"]:
        assert len(t["warm_s"]) == 2 and min(t["warm_s"]) > 0 and t["first_run_s"] > 0
        assert t["median_s"] > 0 and 0 < t["min_s"] <= t["median_s"] and t["s_per_image"] > 0
        assert t["sampler"] == "ddim" and t["steps"] == 2 and len(t["load_1min"]) == 2
        extra = TXT_MULTIPLE if t["task"] == "outpaint" else 0
        assert t["image_shape"] == [32, 48 + extra, 3], t["task"]


@pytest.mark.parametrize(
    ("name", "size", "tasks"),
    [
        ("ldm_inpaint", (24, 32), ("inpaint", "outpaint")),
        ("class", (16, 24), ("class", "img2img", "inpaint", "outpaint")),
        ("uncond", (16, 16), ("uncond", "img2img", "inpaint", "outpaint")),
        ("sr", (32, 64), ("upscale",)),
        ("semantic", (24, 32), ("semantic",)),
        ("layout", (16, 24), ("layout",)),
    ],
)
def test_every_family_gets_inputs_its_tasks_accept(
    files: dict[str, Path], runtime: Runtime, name: str, size: tuple[int, int], tasks: tuple[str, ...]
) -> None:
    assert supported(files[name]) == tasks
    options = BenchOptions(model=str(files[name]), size=size, steps=2, repeats=1)
    report = run(options, runtime)
    assert [t.task for t in report.tasks] == list(tasks)
    check_timings(report, 1)
    h, w = size
    for t in report.tasks:
        extra = F4_MULTIPLE if t.task == "outpaint" else 0
        assert t.image_shape == (h, w + extra, 3), t.task
    if name == "sr":  # x4 from a low-res image of a quarter of each side
        assert report.tasks[0].input_shape == (h // F4, w // F4, 3)


def test_a_subset_in_the_order_given(files: dict[str, Path], runtime: Runtime) -> None:
    options = BenchOptions(model=str(files["class"]), tasks=("outpaint", "class"), size=(16, 16), steps=2)
    report = run(options, runtime)
    assert [t.task for t in report.tasks] == ["outpaint", "class"]
    check_timings(report, 3)  # the CPU default
    assert all(t.request["accelerate"] is True and t.request["use_ema"] is False for t in report.tasks)


def test_ema_and_no_accelerate_reach_the_requests(
    files: dict[str, Path], no_entrypoints: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench-tasks",
        "--model",
        str(files["txt"]),
        "--tasks",
        "txt2img",
        "--steps",
        "1",
        "--repeats",
        "1",
    ]
    args = build_parser().parse_args([*argv, "--no-accelerate", "--no-prompt-cache"])
    options = BenchOptions.from_args(args)
    assert not options.accelerate and not options.use_ema and not options.prompt_cache
    report = run(options)
    assert [t.request["accelerate"] for t in report.tasks] == [False]
    assert report.prompt_cache == {"capacity": 0, "hits": 0, "misses": 4}  # 2 runs x (prompt, negative)
    # --ema reaches the loader: the tiny models are saved without EMA weights, which it says
    assert main([*argv, "--ema"]) == 1
    assert "has no EMA weights" in capsys.readouterr().err


def test_a_random_model_of_the_sd15_architecture_at_ci_size(tmp_path: Path, runtime: Runtime) -> None:
    """``--random-model sd15-ci``: SD 1.x's architecture shrunk as the sampling bench's ``--size ci`` (its
    37,522,628-parameter UNet, docs/benchmarks.md), with CLIP ViT-L/14's whole text tower (123,060,480
    parameters), written once into ``--random-dir`` and timed like any model file."""
    from ldm_sdk import load

    options = BenchOptions(
        random_model="sd15-ci",
        random_dir=str(tmp_path),
        tasks=("txt2img",),
        size=(64, 64),
        steps=1,
        repeats=1,
    )
    report = run(options, runtime)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and report.model == str(files[0]) and report.random_model == "sd15-ci"
    assert [t.task for t in report.tasks] == ["txt2img"] and report.tasks[0].image_shape == (64, 64, 3)
    bundle = load(files[0])
    assert bundle.model is not None
    assert sum(p.numel() for p in bundle.model.parameters()) == 37_522_628
    assert sum(v.numel() for v in bundle.cond_stage_weights.values()) == 123_060_480
    assert bundle.config.cond_stage is not None and bundle.config.cond_stage.target.endswith(
        "FrozenCLIPEmbedder"
    )
    stamp = files[0].stat().st_mtime_ns
    run(options, runtime)  # the file is reused, not written again
    assert files[0].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="either --model"):
        run(BenchOptions(model=str(files[0]), random_model="sd15-ci"), runtime)


def test_a_random_sd15_inpainting_model_at_ci_size_inpaints(tmp_path: Path, runtime: Runtime) -> None:
    """``--random-model sd15-inpaint-ci``: the SD-1.5 inpainting family (9 input channels, hybrid
    conditioning) at the CI size; its inpaint task runs (the mask and masked image concatenated)."""
    from ldm_sdk import load

    options = BenchOptions(
        random_model="sd15-inpaint-ci",
        random_dir=str(tmp_path),
        tasks=("inpaint",),
        size=(64, 64),
        steps=1,
        repeats=1,
    )
    report = run(options, runtime)
    (path,) = tmp_path.glob("*.safetensors")
    assert [t.task for t in report.tasks] == ["inpaint"] and report.tasks[0].image_shape == (64, 64, 3)
    bundle = load(path)
    assert bundle.family == "sd1-inpaint" and bundle.model is not None
    assert bundle.config.unet is not None and bundle.config.unet.in_channels == 9
    assert bundle.config.unet.model_channels == 64


# -- errors ----------------------------------------------------------------------------------------------
def test_unsupported_task_names_what_the_model_supports(files: dict[str, Path], runtime: Runtime) -> None:
    can = ", ".join(supported(files["txt"]))
    options = BenchOptions(model=str(files["txt"]), tasks=("txt2img", "class"), steps=2, repeats=1)
    with pytest.raises(UnsupportedTaskError, match=f"cannot do 'class'; it supports: {can}$"):
        run(options, runtime)


def test_unknown_task_names_the_builtin_tasks(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], no_entrypoints: None
) -> None:
    argv = ["bench-tasks", "--model", str(files["txt"]), "--tasks", "txt2img,sketch", "--steps", "2"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        f"ldm-sdk bench-tasks: error: unknown task(s) 'sketch'; built-in tasks: {', '.join(BUILTIN_TASKS)}"
    )


def test_without_a_model_the_tasks_own_error(
    capsys: pytest.CaptureFixture[str], no_entrypoints: None
) -> None:
    assert main(["txt2img", "a cat"]) == 1
    task_error = capsys.readouterr().err.strip().removeprefix("ldm-sdk txt2img: error: ")
    assert task_error == str(NoDefaultModelError())
    assert main(["bench-tasks"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"ldm-sdk bench-tasks: error: {task_error}"


def test_a_size_that_is_not_a_multiple_names_the_valid_sizes(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], no_entrypoints: None
) -> None:
    argv = ["bench-tasks", "--model", str(files["txt"]), "--steps", "2", "--size", "40x32"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was timed
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm-sdk bench-tasks: error: ")
    assert f"not a multiple of {TXT_MULTIPLE}" in lines[0] and "width 40: use 32 or 48" in lines[0]
    assert "height" not in lines[0]  # 32 is valid


def test_counts_below_one_are_refused(files: dict[str, Path], runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="--repeats must be at least 1; got 0"):
        run(BenchOptions(model=str(files["txt"]), repeats=0), runtime)
    with pytest.raises(TaskError, match="steps"):  # the request's own validation
        run(BenchOptions(model=str(files["txt"]), steps=20000, repeats=1), runtime)


# -- options ---------------------------------------------------------------------------------------------
def test_size_and_task_options() -> None:
    assert parse_size("512") == (512, 512)
    assert parse_size("768x512") == (512, 768)  # WxH in, (height, width) out
    for bad in ("0", "12x", "x", "a", "8x8x8", "-16"):
        with pytest.raises(argparse.ArgumentTypeError, match="N \\(square\\) or WxH"):
            parse_size(bad)
    assert parse_tasks(" inpaint, txt2img,,inpaint ") == ("inpaint", "txt2img")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_tasks(" , ")


def test_the_command_is_registered_and_imports_no_torch() -> None:
    assert COMMANDS["bench-tasks"] == "ldm_sdk.commands.bench_tasks"
    code = "import sys, ldm_sdk.commands.bench_tasks; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_batch_and_together_reach_the_requests(
    files: dict[str, Path], no_entrypoints: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench-tasks", "--model", str(files["txt"]), "--tasks", "txt2img", "--steps", "1"]
    argv += ["--repeats", "1"]
    options = BenchOptions.from_args(build_parser().parse_args([*argv, "--batch", "3", "--together"]))
    assert options.batch == 3 and options.together
    report = run(options)
    t = report.tasks[0]
    assert t.batch == 3 and t.request["batch_mode"] == "together"
    assert t.s_per_image == pytest.approx(t.median_s / 3)
    assert "3 images per run, sampled together (groups of up to 8)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--batch must be at least 1"):
        BenchOptions(model=str(files["txt"]), batch=0).check()
