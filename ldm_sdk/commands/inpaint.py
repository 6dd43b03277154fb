"""``ldm-sdk inpaint IMAGE MASK --model CKPT [--prompt TEXT]``: repaint the white part of MASK.

Mask convention: white = repaint, black = keep (grey is binarised at 50%). Pixels outside the (grown) mask
come back byte-identical.
"""

from __future__ import annotations

import argparse

from ldm_sdk.commands import task_cli

HELP = "repaint the region of IMAGE that MASK marks white; the rest stays byte-identical"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="input image file")
    parser.add_argument("mask", help="mask image, same size: white = repaint, black = keep")
    parser.add_argument("--grow", type=int, default=0, help="dilate the mask by N pixels first")
    parser.add_argument(
        "--feather",
        type=float,
        default=0.0,
        help="soften the composite edge (Gaussian sigma, px), inside the mask",
    )
    parser.add_argument(
        "--method",
        choices=("auto", "model", "blend"),
        default="auto",
        help="model: a dedicated inpainting model's mask conditioning; blend: keep the unmasked latent at "
        "every step (any model); auto: model when it can (default)",
    )
    task_cli.add_image_task_arguments(parser, "inpaint")


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task(
        "inpaint",
        args,
        mask=args.mask,
        grow=args.grow,
        feather=args.feather,
        method=args.method,
        **task_cli.image_task_fields(args),
    )
