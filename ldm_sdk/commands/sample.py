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
    parser.add_argument("-W", "--width", type=int, help="width in pixels (default: the model's)")
    parser.add_argument("-H", "--height", type=int, help="height in pixels (default: the model's)")
    task_cli.add_model_arguments(parser)
    task_cli.add_sampling_arguments(parser)
    task_cli.add_output_arguments(parser, "sample")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.tasks import get_task

    fields = task_cli.common_fields(args)
    fields.update(width=args.width, height=args.height)
    if args.class_label is not None:
        fields.update(class_label=args.class_label, uncond_class=args.uncond_class)
        return task_cli.execute(get_task("class"), fields, args)
    if args.uncond_class is not None:
        from ldm_sdk.tasks.base import TaskError

        raise TaskError("--uncond-class needs --class (the label to sample)")
    return task_cli.execute(get_task("uncond"), fields, args)
