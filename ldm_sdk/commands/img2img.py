"""``ldm-sdk img2img IMAGE --model CKPT [--prompt TEXT] [--strength S]``: SDEdit image to image."""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "re-imagine an image (SDEdit): noise it by --strength and denoise it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input image file")
    parser.add_argument(
        "-s", "--strength", type=float, default=0.75, help="in (0, 1]: how much to change (default 0.75)"
    )
    task_cli.add_image_task_arguments(parser, "img2img")


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task("img2img", args, strength=args.strength, **task_cli.image_task_fields(args))
