"""``ldm-sdk train autoencoder|ldm [OPTIONS]``: the training scripts, from the command line.

Everything after the stage goes to the script's ``main``: ``ldm-sdk train ldm --help`` lists its options.
Several processes: launch the module with torchrun instead (``torchrun --nproc_per_node=N -m
ldm_sdk.training.train_ldm ...``); see :mod:`ldm_sdk.training.distributed`.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "train a first-stage autoencoder (autoencoder) or a latent diffusion model (ldm)"
SCRIPTS = {"autoencoder": "ldm_sdk.training.train_autoencoder", "ldm": "ldm_sdk.training.train_ldm"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=sorted(SCRIPTS), help="what to train")
    parser.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="the training script's options (see: ldm-sdk train STAGE --help)",
    )


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(SCRIPTS[args.stage])
    module.main(list(args.options))
    return 0
