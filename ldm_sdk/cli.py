"""``ldm-sdk``: the command line. Each subcommand lives in its own module under :mod:`ldm_sdk.commands`.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; register it
in :data:`COMMANDS`. Modules are imported only to build the parser, and keep heavy imports (torch) inside
``run``, so ``ldm-sdk --help`` stays fast. Errors a user can fix (``ValueError``, ``OSError``, YAML errors:
unreadable or unsafe files, unknown families, mismatched configs, invalid YAML) print as
``ldm-sdk <command>: error: ...`` and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

# subcommand -> module defining HELP, add_arguments(parser), run(args) -> int
COMMANDS: dict[str, str] = {
    "bench": "ldm_sdk.commands.bench",
    "bench-tasks": "ldm_sdk.commands.bench_tasks",
    "eval": "ldm_sdk.commands.eval",
    "inspect": "ldm_sdk.commands.inspect",
    "plugins": "ldm_sdk.commands.plugins",
    "train": "ldm_sdk.commands.train",
    "txt2img": "ldm_sdk.commands.txt2img",
    "sample": "ldm_sdk.commands.sample",
    "img2img": "ldm_sdk.commands.img2img",
    "inpaint": "ldm_sdk.commands.inpaint",
    "outpaint": "ldm_sdk.commands.outpaint",
    "replay": "ldm_sdk.commands.replay",
    "upscale": "ldm_sdk.commands.upscale",
    "semantic": "ldm_sdk.commands.semantic",
    "layout": "ldm_sdk.commands.layout",
}


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    from ldm_sdk import __version__

    parser = argparse.ArgumentParser(
        prog="ldm-sdk", description="Latent Diffusion Models as an image-editing SDK."
    )
    parser.add_argument("--version", action="version", version=f"ldm-sdk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = _command_module(name)
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (file, config), not a bug: reported in one message, no traceback."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    try:
        import yaml

        errors.append(yaml.YAMLError)  # a config file that is not valid YAML
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = _command_module(args.command)
    try:
        return int(module.run(args) or 0)
    except _user_errors() as e:
        message = str(e) or type(e).__name__
        print(f"ldm-sdk {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ldm-sdk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
