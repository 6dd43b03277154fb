"""Flags the large-image commands (upscale, semantic, layout) share: tiling and the memory budget."""

from __future__ import annotations

import argparse
from typing import Any

from ldm_sdk.commands import task_cli


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiling (large images)")
    group.add_argument(
        "--tile",
        type=int,
        metavar="PX",
        help="denoise and decode in windows of PX x PX output pixels, a multiple of the model's size "
        "multiple (default: whole, unless the memory budget needs windows)",
    )
    group.add_argument(
        "--overlap",
        type=int,
        default=64,
        metavar="PX",
        help="how far windows overlap, in output pixels, a multiple of the latent factor (default 64)",
    )
    group.add_argument(
        "--memory-budget",
        type=int,
        dest="memory_budget_mb",
        metavar="MB",
        help="activation memory to plan windows for (default: 80%% of the free GPU memory; none on CPU)",
    )


def tiling_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {"tile": args.tile, "overlap": args.overlap, "memory_budget_mb": args.memory_budget_mb}


def add_large_image_arguments(
    parser: argparse.ArgumentParser, default_stem: str, *, guidance: bool = True
) -> None:
    """The flags a large-image command ends with: tiling, model, sampling, output."""
    add_tiling_arguments(parser)
    task_cli.add_run_arguments(parser, default_stem, guidance=guidance)
