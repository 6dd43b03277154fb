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
    task_cli.add_condition_arguments(parser)
    task_cli.add_fit_arguments(parser)
    task_cli.add_model_arguments(parser)
    task_cli.add_sampling_arguments(parser)
    task_cli.add_output_arguments(parser, "img2img")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.tasks import get_task

    fields = task_cli.common_fields(args)
    fields.update(
        image=args.image,
        strength=args.strength,
        fit=args.fit,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        class_label=args.class_label,
        uncond_class=args.uncond_class,
    )
    return task_cli.execute(get_task("img2img"), fields, args)
