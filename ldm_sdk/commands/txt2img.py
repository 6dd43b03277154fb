"""``ldm-sdk txt2img PROMPT --model CKPT``: text to image with a text-conditioned model."""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "make images from a text prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    parser.add_argument("-W", "--width", type=int, help="width in pixels (default: the model's)")
    parser.add_argument("-H", "--height", type=int, help="height in pixels (default: the model's)")
    task_cli.add_model_arguments(parser)
    task_cli.add_sampling_arguments(parser)
    task_cli.add_output_arguments(parser, "txt2img")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.tasks import get_task

    fields = task_cli.common_fields(args)
    fields.update(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height
    )
    return task_cli.execute(get_task("txt2img"), fields, args)
