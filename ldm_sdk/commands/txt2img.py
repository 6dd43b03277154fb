"""``ldm-sdk txt2img PROMPT --model CKPT``: text to image with a text-conditioned model."""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "make images from a text prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    task_cli.add_size_arguments(parser)
    task_cli.add_run_arguments(parser, "txt2img")


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task(
        "txt2img",
        args,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
    )
