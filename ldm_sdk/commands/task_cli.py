"""What the task commands (txt2img, sample, img2img, inpaint, outpaint, replay) share: the common flags,
building the request (one-line errors), running it as a runtime job with a progress bar, writing the outputs.

Outputs are written all-or-nothing after the job succeeded (temporary names, renamed at the end): on any
error, or Ctrl-C (which cancels the job within one step), no output file exists.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks.base import Task, TaskInputs, TaskRequest, TaskResult

SAMPLER_HELP = "sampler: ddim (default), plms, dpmpp_2m, euler_ancestral, ddpm, or one from a plugin"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument(
        "--model", metavar="CKPT", help="checkpoint file (.safetensors/.ckpt) or diffusers folder"
    )
    group.add_argument(
        "--config", metavar="YAML", help="the checkpoint's original YAML config (default: detect)"
    )
    group.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    group.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    group.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="compute dtype (default: per device)"
    )
    group.add_argument(
        "--no-accelerate",
        dest="accelerate",
        action="store_false",
        help="on CUDA, run the network eagerly instead of replaying CUDA graphs (same result, slower)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, guidance: bool = True) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", default="ddim", help=SAMPLER_HELP)
    group.add_argument("--steps", type=int, help="sampling steps (default 50; ddpm: every timestep)")
    group.add_argument(
        "--spacing",
        choices=("uniform", "quad", "linspace", "karras"),
        help="timestep spacing (default: uniform; karras for dpmpp_2m; linspace for euler_ancestral)",
    )
    group.add_argument(
        "--eta", type=float, help="sampler noise (ddim: 0 default; euler_ancestral: 1 default)"
    )
    if guidance:
        group.add_argument(
            "--cfg",
            type=float,
            dest="guidance",
            help="classifier-free guidance scale (default 7.5 with text)",
        )
    group.add_argument("--seed", type=int, help="seed; batch item i uses seed + i (default: random, printed)")
    group.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    group.add_argument(
        "--together",
        dest="batch_mode",
        action="store_const",
        const="together",
        help="sample the batch in groups of up to 8 images at once: faster, each image equal to its single "
        "run up to rounding (default: one after another, each exactly its single run)",
    )


def add_output_arguments(parser: argparse.ArgumentParser, default_stem: str) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "-o",
        "--output",
        default=f"{default_stem}.png",
        help=f"a .png file (a batch writes NAME-0.png, NAME-1.png ...) or an existing folder "
        f"(default: {default_stem}.png)",
    )
    group.add_argument("--no-sidecar", action="store_true", help="do not write NAME.json manifests beside")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument(
        "--pad",
        dest="fit",
        action="store_const",
        const="pad",
        help="a size that is not a multiple of the model's: pad the right/bottom edges (result cropped back)",
    )
    fit.add_argument(
        "--crop",
        dest="fit",
        action="store_const",
        const="crop",
        help="a size that is not a multiple of the model's: drop the right/bottom remainder",
    )
    parser.set_defaults(fit="error")


def add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("condition (what the model takes)")
    group.add_argument("-p", "--prompt", help="text prompt (text-conditioned models)")
    group.add_argument("-n", "--negative-prompt", default="", help="negative prompt (guidance's other half)")
    group.add_argument("--class", dest="class_label", type=int, help="class label (class-conditional models)")
    group.add_argument(
        "--uncond-class", type=int, help="the model's null class, for guidance (cin256-v2: 1000)"
    )


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-W", "--width", type=int, help="width in pixels (default: the model's)")
    parser.add_argument("-H", "--height", type=int, help="height in pixels (default: the model's)")


def add_run_arguments(parser: argparse.ArgumentParser, default_stem: str, *, guidance: bool = True) -> None:
    """The model, sampling and output flags every task command ends with."""
    add_model_arguments(parser)
    add_sampling_arguments(parser, guidance=guidance)
    add_output_arguments(parser, default_stem)


def add_image_task_arguments(parser: argparse.ArgumentParser, default_stem: str) -> None:
    """The flags of the commands that edit an image (img2img, inpaint, outpaint) after their own:
    condition, fit, model, sampling, output."""
    add_condition_arguments(parser)
    add_fit_arguments(parser)
    add_run_arguments(parser, default_stem)


def image_task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of :func:`add_image_task_arguments`'s flags and the ``image`` argument."""
    return {
        "image": args.image,
        "fit": args.fit,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "class_label": args.class_label,
        "uncond_class": args.uncond_class,
    }


def common_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Request fields from the common flags (the seed drawn at random when not given)."""
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    fields: dict[str, Any] = {
        "model": args.model,
        "config": args.config,
        "use_ema": args.ema,
        "sampler": args.sampler,
        "steps": args.steps,
        "spacing": args.spacing,
        "eta": args.eta,
        "guidance": getattr(args, "guidance", None),
        "seed": seed,
        "batch": args.batch,
        "batch_mode": getattr(args, "batch_mode", None),
        "device": args.device,
        "dtype": args.dtype,
        "accelerate": getattr(args, "accelerate", True),
    }
    return fields


def build_request(task: Task, fields: Mapping[str, Any]) -> TaskRequest:
    """The task's request from ``fields`` (None values left to the defaults); one-line errors."""
    from ldm_sdk.tasks.base import parse_request

    return parse_request(task.request_type, {k: v for k, v in fields.items() if v is not None})


def make_runtime(args: argparse.Namespace) -> Runtime:
    from ldm_sdk.runtime import Runtime

    return Runtime.create(device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))


def run_job(
    task: Task,
    request: TaskRequest,
    runtime: Runtime,
    *,
    inputs: TaskInputs | None = None,
    quiet: bool = False,
    run: Any = None,
) -> TaskResult:
    """Run ``task`` as a job on ``runtime`` with a rich progress bar (step, it/s, ETA) on stderr; Ctrl-C
    cancels the job (within one step) and re-raises ``KeyboardInterrupt``. ``run(callback)`` replaces the
    task call (replay)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Task as ProgressTask,
    )
    from rich.text import Text

    from ldm_sdk.jobs import JobCancelledError, JobContext
    from ldm_sdk.samplers.base import StepInfo

    class SpeedColumn(ProgressColumn):
        def render(self, task: ProgressTask) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} it/s" if speed else "-- it/s")

    console = Console(stderr=True)
    progress = Progress(
        TextColumn(f"[bold]{task.name}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        SpeedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    bar = progress.add_task(task.name, total=None)
    started = False

    def on_step(info: StepInfo) -> None:
        nonlocal started
        if not started:  # the bar appears with the first step: nothing is drawn for a run that fails early
            started = True
            progress.start()
        progress.update(bar, completed=info.step + 1, total=info.total)

    def job_fn(ctx: JobContext) -> TaskResult:
        callback = ctx.step_callback(then=on_step)
        if run is not None:
            return run(callback)  # type: ignore[no-any-return]
        return task(request, runtime, inputs=inputs, callback=callback)

    job = runtime.submit(job_fn, name=task.name)
    try:
        while not job.wait(0.1):
            pass
    except KeyboardInterrupt:
        job.cancel()
        job.wait()
        raise
    finally:
        if started:
            progress.stop()
    try:
        return job.result()
    except JobCancelledError:
        raise KeyboardInterrupt from None


def write_result(result: TaskResult, args: argparse.Namespace) -> int:
    from ldm_sdk.tasks.images import save_outputs

    paths = save_outputs(result, args.output, sidecar=not args.no_sidecar)
    for path, seed in zip(paths, result.seeds, strict=True):
        print(f"{path}  (seed {seed})")
    return 0


def check_output(args: argparse.Namespace, count: int, stem: str) -> None:
    """Fail before any work when the output cannot be written (bad suffix, missing folder)."""
    from ldm_sdk.tasks.images import output_paths

    output_paths(args.output, count, stem=stem)


def run_task(name: str, args: argparse.Namespace, **fields: Any) -> int:
    """:func:`execute` the task called ``name`` with the common fields and ``fields``."""
    from ldm_sdk.tasks import get_task

    return execute(get_task(name), {**common_fields(args), **fields}, args)


def execute(task: Task, fields: dict[str, Any], args: argparse.Namespace, inputs: Any = None) -> int:
    """Build the request, check the output, run the job, write the files."""
    from ldm_sdk.tasks.base import NoDefaultModelError

    request = build_request(task, fields)
    if request.model is None:
        raise NoDefaultModelError()
    check_output(args, request.batch, task.name)
    with make_runtime(args) as runtime:
        result = run_job(task, request, runtime, inputs=inputs, quiet=args.quiet)
    return write_result(result, args)
