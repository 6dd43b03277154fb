"""``ldm-sdk plugins [--json]``: every plugin (built-in, installed, disabled) and what it registered."""

from __future__ import annotations

import argparse
import dataclasses
import json

HELP = "list plugins (built-in, installed, disabled) with their versions and what each registered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.runtime import Runtime

    with Runtime.create(device="cpu") as runtime:
        infos = runtime.plugins()
    if args.json:
        print(json.dumps([dataclasses.asdict(info) for info in infos], indent=2, default=str))
        return 0
    for info in infos:
        origin = f"[{info.distribution or info.source}]"
        state = "" if info.enabled else "(disabled)"
        print(" ".join(part for part in (info.name, info.version, origin, state) if part))
        for kind, names in info.registered.items():
            print(f"    {kind}: {', '.join(names)}")
    return 0
