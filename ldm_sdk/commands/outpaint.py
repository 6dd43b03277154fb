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
    task_cli.add_image_task_arguments(parser, "outpaint")


def run(args: argparse.Namespace) -> int:
    sides = {side: getattr(args, side) for side in ("left", "right", "top", "bottom")}
    return task_cli.run_task(
        "outpaint",
        args,
        fill=args.fill,
        feather=args.feather,
        method=args.method,
        **sides,
        **task_cli.image_task_fields(args),
    )
