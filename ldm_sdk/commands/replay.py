"""``ldm-sdk replay MANIFEST [-o OUT]``: re-run the task that wrote a PNG (or its .json manifest).

The model and the input files are checked against the hashes the manifest recorded. On the same device,
dtype and versions the result is bit-identical; with a PNG as MANIFEST the command says whether it is
(``--check``: exit 1 when it is not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm_sdk.commands import task_cli

HELP = "re-run the task recorded in a PNG's manifest (or its .json sidecar); bit-exact on the same device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="a PNG written by ldm-sdk, or its .json manifest")
    parser.add_argument("--inputs-dir", help="folder to find the model and input files in (by file name)")
    parser.add_argument("--model", help="the model file, when it moved (its sha256 must match)")
    parser.add_argument("--device", help="run on this device instead of the recorded one (not bit-exact)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="instead of the recorded dtype")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the pixels equal the PNG's")
    task_cli.add_output_arguments(parser, "replay")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ldm_sdk.tasks import get_task
    from ldm_sdk.tasks.images import read_image
    from ldm_sdk.tasks.manifest import read_manifest, replay

    manifest = read_manifest(args.manifest)
    task = get_task(manifest.task)
    task_cli.check_output(args, len(manifest.seeds), task.name)
    with task_cli.make_runtime(argparse.Namespace(device=args.device or manifest.device, dtype=None)) as rt:

        def go(callback: object) -> object:
            return replay(
                manifest,
                rt,
                inputs_dir=args.inputs_dir,
                model=args.model,
                device=args.device,
                dtype=args.dtype,
                callback=callback,  # type: ignore[arg-type]
            )

        result = task_cli.run_job(task, None, rt, quiet=args.quiet, run=go)  # type: ignore[arg-type]
    task_cli.write_result(result, args)
    source = Path(args.manifest)
    if source.suffix.lower() != ".png" or len(result.images) != 1:
        return 0
    original = read_image(source)
    if original.shape == result.images[0].shape and np.array_equal(original, result.images[0]):
        print(f"identical to {source}")
        return 0
    diff = (
        int(np.abs(original.astype(int) - result.images[0].astype(int)).max())
        if original.shape == result.images[0].shape
        else "shape"
    )
    print(f"differs from {source} (max abs difference: {diff})", file=sys.stderr)
    return 1 if args.check else 0
