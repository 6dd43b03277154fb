"""``ldm-sdk outpaint IMAGE --right 256 --model CKPT [--prompt TEXT]``: extend the canvas and paint it."""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "extend IMAGE by --left/--right/--top/--bottom pixels and paint the new area"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input image file")
    for side in ("left", "right", "top", "bottom"):
        parser.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    parser.add_argument(
        "--fill",
        choices=("edge", "reflect", "noise"),
        default="edge",
        help="what the new area starts from (default: edge)",
    )
    parser.add_argument("--feather", type=float, default=0.0, help="soften the seam (Gaussian sigma, px)")
    parser.add_argument("--method", choices=("auto", "model", "blend"), default="auto", help="as for inpaint")
    task_cli.add_condition_arguments(parser)
    task_cli.add_fit_arguments(parser)
    task_cli.add_model_arguments(parser)
    task_cli.add_sampling_arguments(parser)
    task_cli.add_output_arguments(parser, "outpaint")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.tasks import get_task

    fields = task_cli.common_fields(args)
    fields.update(
        image=args.image,
        left=args.left,
        right=args.right,
        top=args.top,
        bottom=args.bottom,
        fill=args.fill,
        feather=args.feather,
        method=args.method,
        fit=args.fit,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        class_label=args.class_label,
        uncond_class=args.uncond_class,
    )
    return task_cli.execute(get_task("outpaint"), fields, args)
