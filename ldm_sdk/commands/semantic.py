"""``ldm-sdk semantic MAP --model CKPT [--palette JSON]``: a semantic map -> an image of the map's size.

MAP is a single-channel PNG of class ids (mode L / I / P: a P image's indices are the ids), or a colour
image with ``--palette`` (JSON list: entry i is class i's colour, [r, g, b] or "#rrggbb"). Larger than the
model was trained on works (the UNet is convolutional); ``--tile`` / ``--memory-budget`` make it windowed.
"""

from __future__ import annotations

import argparse

from ldm_sdk.commands import large_image, task_cli

HELP = "render a semantic map (class ids, or colours with --palette) as an image, at any size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "semantic_map", metavar="MAP", help="PNG of class ids, or a colour map with --palette"
    )
    parser.add_argument(
        "--palette", metavar="JSON", help="class colours: JSON list, entry i = class i's colour"
    )
    task_cli.add_fit_arguments(parser)
    # the map cannot be dropped: no guidance
    large_image.add_large_image_arguments(parser, "semantic", guidance=False)


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task(
        "semantic",
        args,
        semantic_map=args.semantic_map,
        palette=args.palette,
        fit=args.fit,
        **large_image.tiling_fields(args),
    )
