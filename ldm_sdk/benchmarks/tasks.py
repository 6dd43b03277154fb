"""Task-timing benchmark: how long each editing task a model supports takes on this machine, end to end.

    ldm-sdk bench-tasks --model CKPT                          # every supported task, on the CPU
    ldm-sdk bench-tasks --model CKPT --tasks txt2img,inpaint --size 512 --out bt.json
    ldm-sdk bench-tasks --model CKPT --device cuda            # 50 steps, 5 timed runs per task

Each task is called as users call it, ``task(request, runtime, inputs=...)`` with a request that names the
model file (so the model comes through the runtime's cache) and in-memory inputs: from the request to the
decoded uint8 images, condition encoding, first-stage encode / decode and the manifest included. The
requests keep every task default except ``steps``, ``seed``, ``device`` and ``dtype`` (and ``use_ema`` /
``accelerate`` when asked: ``accelerate`` stays on by default, the CUDA-graph fast path where it applies;
``--no-accelerate`` times the eager network for comparison).

What is measured:

- ``load_s``: loading the model into the runtime's cache (``load_bundle``, as the first task would), before
  anything is timed; the tasks then reuse the cached model.
- ``first_run_s``: the first call of each task after that. It pays for what a task does once per loaded model
  or input shape: building the condition encoder (the first task that needs it), lazy kernel set-up and, on
  CUDA, capturing the CUDA graphs.
- ``warm_s``: ``repeats`` further calls; the table shows their median and minimum and the median per image.
  On CUDA the device is synchronized before each clock reading.

Every run has the same prompt. With the runtime's prompt cache on (the default) the warm runs reuse its
encoding, as a user rerunning a prompt with another seed or mask does; ``--no-prompt-cache`` (a runtime with
``prompt_cache_size=0``) encodes it in every run. The report counts the cache's hits and misses.

Synthetic inputs, deterministic, at the benchmark size (``--size``, default the model's training size,
which must be a multiple of the model's size multiple): a smooth colour image; for inpaint a centred
rectangle covering half of each side; outpaint adds one size multiple on the right (its images are wider by
that); upscale gets a low-res image of the size divided by the latent factor (its images have the benchmark
size); semantic a map of vertical bands of the model's classes; layout two class-0 boxes. Text models get
a short prompt, class-conditional models class label 0. img2img keeps its default strength 0.75, so it runs
three quarters of the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ldm_sdk.benchmarks import common as C
from ldm_sdk.tasks import BUILTIN_TASKS, get_task
from ldm_sdk.tasks.base import TaskError, TaskInputs, TaskRequest, TaskResult, parse_request
from ldm_sdk.tasks.context import (
    bundle_device_dtype,
    check_size,
    cond_modality,
    default_size,
    load_bundle,
    require_task,
    size_multiple,
    supported_tasks,
)

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.registry import Registry
    from ldm_sdk.runtime import Runtime

__all__ = [
    "BenchOptions",
    "BenchReport",
    "TaskJob",
    "TaskTiming",
    "build_job",
    "measure",
    "run",
    "select_tasks",
    "show",
]

#: the prompt of text-conditioned models (short enough for a 16-token text encoder)
PROMPT = "a lighthouse on a rocky coast at sunset"
#: sampling steps and timed runs per task by default: on the CPU, and on an accelerator (cuda, mps)
CPU_STEPS, GPU_STEPS = 10, 50
CPU_REPEATS, GPU_REPEATS = 3, 5


# -- options -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    """What to time (see :mod:`ldm_sdk.commands.bench_tasks` for the command-line spelling).

    ``model`` None: the built-in default model (none exists yet: the run stops with the tasks' own
    ``NoDefaultModelError``). ``tasks`` None: every task the model supports. ``size`` ``(height, width)``
    None: the model's training size. ``steps`` / ``repeats`` None: 10 / 3 on the CPU, 50 / 5 elsewhere.
    ``threads``: ``torch.set_num_threads`` before timing. ``use_ema`` / ``accelerate``: the request fields of
    those names. ``batch``: images per run; ``together``: the requests' ``batch_mode="together"`` (else
    ``"items"``). ``prompt_cache`` False: the runtime :func:`run` creates encodes the prompt in every run
    (a runtime passed in keeps its own setting). ``random_model``: instead of ``model``, a model of
    :data:`~ldm_sdk.benchmarks.random_models.RANDOM_MODELS` with random weights, written into
    ``random_dir`` (reused from there when present; None: a temporary folder, removed afterwards).
    ``out``: a JSON file to write."""

    model: str | None = None
    config: str | None = None
    tasks: tuple[str, ...] | None = None
    size: tuple[int, int] | None = None
    steps: int | None = None
    repeats: int | None = None
    seed: int = 0
    batch: int = 1
    together: bool = False
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    use_ema: bool = False
    accelerate: bool = True
    prompt_cache: bool = True
    random_model: str | None = None
    random_dir: str | None = None
    out: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchOptions:
        """The options parsed by :func:`ldm_sdk.commands.bench_tasks.add_arguments`."""
        return cls(
            model=args.model,
            config=args.config,
            tasks=args.tasks,
            size=args.size,
            steps=args.steps,
            repeats=args.repeats,
            seed=args.seed,
            batch=args.batch,
            together=args.together,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            use_ema=args.ema,
            accelerate=args.accelerate,
            prompt_cache=args.prompt_cache,
            random_model=args.random_model,
            random_dir=args.random_dir,
            out=args.out,
        )

    def check(self) -> None:
        """Raise ``ValueError`` for counts below 1 (steps, repeats, threads, batch) and for a random model
        asked for together with a model file or config, or unknown."""
        counts = (
            ("steps", self.steps),
            ("repeats", self.repeats),
            ("threads", self.threads),
            ("batch", self.batch),
        )
        for name, value in counts:
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1; got {value}")
        if self.random_model is not None:
            from ldm_sdk.benchmarks.random_models import RANDOM_MODELS

            if self.model is not None or self.config is not None:
                raise ValueError("give either --model (and --config) or --random-model, not both")
            if self.random_model not in RANDOM_MODELS:
                raise ValueError(
                    f"unknown random model {self.random_model!r}; valid: {', '.join(RANDOM_MODELS)}"
                )


# -- results -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskTiming:
    """One task's measurements (seconds). ``image_shape``: the first image of the last run (H, W, 3);
    ``load_1min``: the 1-minute load average just before each warm run (None where the OS has none);
    ``request``: the request as run."""

    task: str
    first_run_s: float
    warm_s: tuple[float, ...]
    median_s: float
    min_s: float
    s_per_image: float
    batch: int
    steps: int
    sampler: str
    guidance: float
    input_shape: tuple[int, ...] | None
    image_shape: tuple[int, ...]
    load_1min: tuple[float | None, ...]
    request: dict[str, Any]


@dataclass(frozen=True)
class BenchReport:
    """Everything measured. ``size`` is ``(height, width)``; ``cache``: the runtime's model cache counters
    afterwards (``loads`` 1 and no evictions: every task reused the model loaded for ``load_s``);
    ``prompt_cache``: its capacity and the lookups during the runs that it answered (``hits``) or encoded
    (``misses``)."""

    model: str | None
    random_model: str | None
    family: str
    device: str
    dtype: str
    size: tuple[int, int]
    size_multiple: int
    steps: int
    repeats: int
    seed: int
    load_s: float
    tasks: tuple[TaskTiming, ...]
    cache: dict[str, int]
    prompt_cache: dict[str, int]
    env: dict[str, Any]
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskJob:
    """One task's call: its request and in-memory inputs; ``input_shape``: the image (or map) it gets."""

    name: str
    request: TaskRequest
    inputs: TaskInputs
    input_shape: tuple[int, ...] | None


# -- choosing the tasks -----------------------------------------------------------------------------------
def select_tasks(
    bundle: ModelBundle, registry: Registry[Any] | None, requested: Sequence[str] | None
) -> tuple[str, ...]:
    """The tasks to time: ``requested`` (each a built-in task the model supports), else every task the model
    supports. Unknown names raise ``TaskError`` naming the built-in tasks; unsupported ones,
    ``UnsupportedTaskError`` naming the model's."""
    if requested is None:
        names = supported_tasks(bundle, registry)
        if not names:
            raise TaskError(
                f"model {bundle.family!r} supports none of the built-in tasks ({', '.join(BUILTIN_TASKS)}): "
                "nothing to time"
            )
        return names
    unknown = [n for n in requested if n not in BUILTIN_TASKS]
    if unknown:
        raise TaskError(
            f"unknown task(s) {', '.join(map(repr, unknown))}; built-in tasks: {', '.join(BUILTIN_TASKS)}"
        )
    for name in requested:
        require_task(bundle, name, registry)
    return tuple(requested)


# -- synthetic inputs -------------------------------------------------------------------------------------
def smooth_image(height: int, width: int) -> np.ndarray:
    """A uint8 ``H x W x 3`` image of smooth colour gradients (red left to right, green top to bottom, blue
    along the diagonal): something a first stage encodes like a photograph, not noise."""
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    channels = np.broadcast_arrays(x, y, 0.5 + 0.5 * np.sin(np.pi * (x + y)))
    return np.round(255 * np.stack(channels, axis=-1)).astype(np.uint8)


def centre_mask(height: int, width: int) -> np.ndarray:
    """A uint8 ``H x W`` mask, 255 (repaint) on the centred rectangle covering half of each side."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return mask


def band_map(height: int, width: int, n_classes: int) -> np.ndarray:
    """An int64 ``H x W`` class map of ``n_classes`` vertical bands (ids ``0..n_classes-1``)."""
    ids = np.arange(width) * n_classes // width
    return np.broadcast_to(ids[None, :], (height, width)).astype(np.int64)


def synthetic_layout() -> list[dict[str, Any]]:
    """Two class-0 boxes (layout JSON): valid for every class count, since class tokens are the ids."""
    return [
        {"class_id": 0, "box": [0.1, 0.45, 0.45, 0.95]},
        {"class_id": 0, "box": [0.55, 0.1, 0.9, 0.7]},
    ]


def _cond_stage_param(bundle: ModelBundle, name: str) -> Any:
    cond = bundle.config.cond_stage
    return cond.params.get(name) if cond is not None else None


def condition_fields(bundle: ModelBundle, registry: Registry[Any] | None) -> dict[str, Any]:
    """The request fields of the model's condition: the prompt (text), class label 0 (class), else none."""
    modality = cond_modality(bundle, registry)
    if modality == "text":
        return {"prompt": PROMPT}
    if modality == "class":
        return {"class_label": 0}
    return {}


def build_job(
    name: str,
    bundle: ModelBundle,
    registry: Registry[Any] | None,
    size: tuple[int, int],
    common: dict[str, Any],
) -> TaskJob:
    """The request and inputs of task ``name`` at ``size`` ``(height, width)`` (see the module doc);
    ``common``: the request fields every task gets (model, steps, seed, device, dtype)."""
    height, width = size
    image = smooth_image(height, width)
    fields: dict[str, Any] = {}
    inputs = TaskInputs()
    shape: tuple[int, ...] | None = image.shape
    if name in ("txt2img", "class", "uncond"):
        fields = {**condition_fields(bundle, registry), "width": width, "height": height}
        shape = None
    elif name in ("img2img", "inpaint", "outpaint"):
        fields = condition_fields(bundle, registry)
        inputs = TaskInputs(image=image, mask=centre_mask(height, width) if name == "inpaint" else None)
        if name == "outpaint":
            fields["right"] = size_multiple(bundle)
    elif name == "upscale":
        f = bundle.downsampling_factor
        inputs = TaskInputs(image=smooth_image(height // f, width // f))
        shape = inputs.image.shape
    elif name == "semantic":
        n_classes = int(_cond_stage_param(bundle, "in_channels") or 1)
        inputs = TaskInputs(extra={"semantic_map": band_map(height, width, n_classes)})
        shape = (height, width)
    elif name == "layout":
        fields = {"width": width, "height": height}
        if _cond_stage_param(bundle, "n_object_classes") is None:
            fields["n_object_classes"] = 1  # class-0 tokens are the same for any count
        inputs = TaskInputs(extra={"layout": synthetic_layout()})
        shape = None
    else:
        raise TaskError(f"no synthetic inputs for task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    request = parse_request(get_task(name).request_type, {**common, **fields})
    return TaskJob(name, request, inputs, shape)


# -- timing ------------------------------------------------------------------------------------------------
def time_task(job: TaskJob, runtime: Runtime, device: torch.device, repeats: int) -> TaskTiming:
    """One first run, then ``repeats`` warm runs of ``job`` (CUDA synchronized around each)."""
    task = get_task(job.name, runtime)

    def call() -> TaskResult:
        return task(job.request, runtime, inputs=job.inputs)

    first_s, result = C.wall(call, device)
    warm: list[float] = []
    loads: list[float | None] = []
    for _ in range(repeats):
        loads.append(C.load_1min())
        secs, result = C.wall(call, device)
        warm.append(secs)
    median = C.median(warm)
    manifest = result.manifest
    return TaskTiming(
        task=job.name,
        first_run_s=first_s,
        warm_s=tuple(warm),
        median_s=median,
        min_s=min(warm),
        s_per_image=median / job.request.batch,
        batch=job.request.batch,
        steps=manifest.steps,
        sampler=manifest.sampler,
        guidance=manifest.guidance,
        input_shape=job.input_shape,
        image_shape=tuple(result.images[0].shape),
        load_1min=tuple(loads),
        request=job.request.model_dump(mode="json"),
    )


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: device name, CPU, versions, threads, cores, load averages, git."""
    from ldm_sdk import __version__

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else C.cpu_name(),
        "cpu": C.cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "ldm_sdk": __version__,
        "cpu_threads": torch.get_num_threads(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_avg_1_5_15": C.load_averages(),
        "git": C.git_head(),
    }


def measure(options: BenchOptions, runtime: Runtime, *, model_file: str | None = None) -> BenchReport:
    """Load the model (``model_file``, the written ``random_model``, else ``options.model``), check the tasks
    and the size, build every job, then time them one after another."""
    from ldm_sdk.devices import dtype_name, select_device

    options.check()
    placement = {"device": options.device, "dtype": options.dtype}
    model_path = model_file if model_file is not None else options.model
    model = {"model": model_path, "config": options.config, "use_ema": options.use_ema}
    base = parse_request(TaskRequest, {**model, **placement})
    start_device = select_device(options.device)  # for the CUDA synchronization around the load
    load_s, bundle = C.wall(lambda: load_bundle(base, runtime), start_device)
    device, dtype = bundle_device_dtype(bundle)
    registry = runtime.registries.condition_encoders
    names = select_tasks(bundle, registry, options.tasks)
    multiple = size_multiple(bundle)
    size = options.size or default_size(bundle)
    check_size(*size, multiple, what="image", can_fit=False)
    on_cpu = device.type == "cpu"
    steps = options.steps or (CPU_STEPS if on_cpu else GPU_STEPS)
    repeats = options.repeats or (CPU_REPEATS if on_cpu else GPU_REPEATS)
    common = {**model, **placement, "steps": steps, "seed": options.seed, "accelerate": options.accelerate}
    common["batch"] = options.batch
    common["batch_mode"] = "together" if options.together else "items"
    common = {k: v for k, v in common.items() if v is not None}
    jobs = [build_job(name, bundle, registry, size, common) for name in names]
    env = environment(device)
    prompts_before = runtime.prompt_cache.stats()
    timings = tuple(time_task(job, runtime, device, repeats) for job in jobs)
    prompts = runtime.prompt_cache.stats()
    env["load_avg_1_5_15_after"] = C.load_averages()
    stats = runtime.cache_stats()
    notes = []
    if "layout" in names and _cond_stage_param(bundle, "n_object_classes") is None:
        notes.append(
            "layout: the model's config does not say n_object_classes; timed with 1 (the synthetic layout's "
            "class-0 tokens are the same for any count)"
        )
    return BenchReport(
        model=model_path,
        random_model=options.random_model,
        family=bundle.family,
        device=str(device),
        dtype=dtype_name(dtype),
        size=(size[0], size[1]),
        size_multiple=multiple,
        steps=steps,
        repeats=repeats,
        seed=options.seed,
        load_s=load_s,
        tasks=timings,
        cache={"loads": stats.misses, "hits": stats.hits, "evictions": stats.evictions},
        prompt_cache={
            "capacity": runtime.prompt_cache.capacity,
            "hits": prompts.hits - prompts_before.hits,
            "misses": prompts.misses - prompts_before.misses,
        },
        env=env,
        notes=tuple(notes),
    )


# -- output ------------------------------------------------------------------------------------------------
def show(report: BenchReport) -> None:
    """The timings as a rich table on stdout, then what they were measured on."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        "task",
        "first run [s]",
        "warm median [s]",
        "warm min [s]",
        "s/image",
        "steps",
        "sampler",
        "output (WxH)",
        title=f"task timings: {report.family} on {report.device} ({report.dtype})",
    )
    for t in report.tasks:
        h, w = t.image_shape[:2]
        times = [f"{s:.3f}" for s in (t.first_run_s, t.median_s, t.min_s, t.s_per_image)]
        table.add_row(*map(escape, [t.task, *times, str(t.steps), t.sampler, f"{w}x{h}"]))
    console = Console(width=max(120, Console().width))
    console.print(table)
    env = report.env
    h, w = report.size
    lines = [
        f"model {report.model} (family {report.family}"
        + (f"; {report.random_model}: random weights, seed {report.seed}" if report.random_model else "")
        + f"); load into the runtime's cache {report.load_s:.3f} s",
        f"size {w}x{h} (multiple of {report.size_multiple}), {report.steps} steps, seed {report.seed}, "
        f"{report.repeats} warm run(s) per task after the first",
        f"{env['device_name']}; {env['cpu_threads']} torch thread(s), {env['usable_cores']} usable core(s); "
        f"torch {env['torch']}",
    ]
    loads = [v for t in report.tasks for v in t.load_1min if v is not None]
    if loads:
        lines.append(f"1-minute load average during the warm runs: {min(loads):.2f} to {max(loads):.2f}")
    pc = report.prompt_cache
    if pc["hits"] or pc["misses"]:
        state = f"on ({pc['capacity']} prompts)" if pc["capacity"] else "off"
        lines.append(f"prompt cache {state}: {pc['hits']} encoding(s) reused, {pc['misses']} computed")
    first = report.tasks[0] if report.tasks else None
    if first is not None and first.batch > 1:
        mode = first.request.get("batch_mode", "items")
        how = "together (groups of up to 8)" if mode == "together" else "item by item"
        lines.append(f"{first.batch} images per run, sampled {how}; s/image: the median run / {first.batch}")
    for line in [*lines, *report.notes]:
        console.print("- " + escape(line), highlight=False, soft_wrap=True)


def write_json(report: BenchReport, out: str | os.PathLike[str]) -> Path:
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return path


def run(options: BenchOptions, runtime: Runtime | None = None) -> BenchReport:
    """Time the tasks (on ``runtime``, else a new one on ``options.device`` / ``options.dtype``), print the
    table, write ``options.out``."""
    from ldm_sdk.runtime import Runtime

    options.check()
    threads = torch.get_num_threads()
    model_file: str | None = None
    with contextlib.ExitStack() as stack:
        if options.random_model is not None:
            from ldm_sdk.benchmarks.random_models import random_model_file

            folder = options.random_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ldm-sdk-"))
            model_file = str(random_model_file(options.random_model, folder, seed=options.seed))
        if options.threads:
            torch.set_num_threads(options.threads)
            stack.callback(torch.set_num_threads, threads)  # a library call leaves the process as it was
        if runtime is None:
            size = None if options.prompt_cache else 0
            runtime = stack.enter_context(
                Runtime.create(device=options.device, dtype=options.dtype, prompt_cache_size=size)
            )
        report = measure(options, runtime, model_file=model_file)
    show(report)
    if options.out:
        print(f"wrote {write_json(report, options.out)}")
    return report


def main(argv: Sequence[str] | None = None) -> BenchReport:
    """``bench/bench_tasks.py``: parse ``argv`` (default ``sys.argv[1:]``) and run."""
    from ldm_sdk.commands.bench_tasks import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(BenchOptions.from_args(args))
    except (ValueError, OSError) as exc:  # TaskError included: one line, no traceback
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
