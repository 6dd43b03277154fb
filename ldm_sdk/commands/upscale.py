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
    large_image.add_tiling_arguments(parser)
    task_cli.add_model_arguments(parser)
    task_cli.add_sampling_arguments(parser, guidance=False)  # the SR model has no unconditional input
    task_cli.add_output_arguments(parser, "upscale")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.tasks import get_task

    fields = task_cli.common_fields(args)
    fields.update(image=args.image, fit=args.fit, **large_image.tiling_fields(args))
    return task_cli.execute(get_task("upscale"), fields, args)
