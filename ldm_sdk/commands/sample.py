"""``ldm-sdk sample --model CKPT [--class N]``: class-conditional or unconditional sampling."""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "sample a class-conditional (--class N) or unconditional model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--class", dest="class_label", type=int, help="class label (class-conditional models)"
    )
    parser.add_argument(
        "--uncond-class", type=int, help="the model's null class, for guidance (cin256-v2: 1000)"
    )
    task_cli.add_size_arguments(parser)
    task_cli.add_run_arguments(parser, "sample")


def run(args: argparse.Namespace) -> int:
    size = {"width": args.width, "height": args.height}
    if args.class_label is not None:
        return task_cli.run_task(
            "class", args, class_label=args.class_label, uncond_class=args.uncond_class, **size
        )
    if args.uncond_class is not None:
        from ldm_sdk.tasks.base import TaskError

        raise TaskError("--uncond-class needs --class (the label to sample)")
    return task_cli.run_task("uncond", args, **size)
