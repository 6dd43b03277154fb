"""``ldm-sdk layout LAYOUT.json --model CKPT [--classes FILE]``: boxes with object classes -> an image.

LAYOUT.json: ``[{"class_id": 3, "box": [x0, y0, x1, y1]}, {"class": "Dog", "box": [...]}]`` with boxes
relative to the image (0..1); ``{"objects": [...], "crop": [...]}`` also works. Class names need
``--classes`` (JSON list or one name per line); the tokenizer's class count comes from ``--n-classes``,
the config, or the classes file.
"""

from __future__ import annotations

import argparse

from ldm_sdk.commands import large_image, task_cli

HELP = "render a layout (JSON boxes with object classes) as an image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layout", metavar="LAYOUT", help="layout JSON file")
    parser.add_argument(
        "--classes", metavar="FILE", help="class names: JSON list or one per line (line i = id i)"
    )
    parser.add_argument(
        "--n-classes",
        type=int,
        dest="n_object_classes",
        metavar="N",
        help="the model's number of object classes (when its config and --classes do not say)",
    )
    task_cli.add_size_arguments(parser)
    large_image.add_large_image_arguments(parser, "layout")


def run(args: argparse.Namespace) -> int:
    return task_cli.run_task(
        "layout",
        args,
        layout=args.layout,
        classes=args.classes,
        n_object_classes=args.n_object_classes,
        width=args.width,
        height=args.height,
        **large_image.tiling_fields(args),
    )
