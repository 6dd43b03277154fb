"""``ldm-sdk upscale IMAGE --model CKPT [--tile PX --overlap PX]``: x4 super-resolution (LDM-SR, bsr_sr).

Any size: the latent is denoised whole or in blended windows (``--tile``, or when ``--memory-budget``
needs them), the low-res image cropped to each window. Sides must be multiples of the UNet's downsampling
(8 for bsr_sr), or ``--pad`` / ``--crop``.
"""

from __future__ import annotations

import argparse

from ldm_sdk.commands import large_image, task_cli

HELP = "upscale an image 4x with an LDM super-resolution model, tiled for any size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="low-res input image file")
    task_cli.add_fit_arguments(parser)
    # the SR model has no unconditional input: no guidance
    large_image.add_large_image_arguments(parser, "upscale", guidance=False)


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task(
        "upscale", args, image=args.image, fit=args.fit, **large_image.tiling_fields(args)
    )
