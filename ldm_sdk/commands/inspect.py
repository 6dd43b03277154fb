"""``ldm-sdk inspect CHECKPOINT``: what a checkpoint is, without building its networks.

The file is read safely, its configuration resolved (``--config``, the one ldm-sdk embedded, or detected)
and its keys checked strictly against that configuration on the meta device, so a file that inspects
cleanly loads. Parameter counts are the number of values of the file's tensors, per part.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

HELP = "show a checkpoint's family, parts, latent space, conditioning and EMA state"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=".safetensors or .ckpt/.pt/.pth/.bin file")
    parser.add_argument(
        "--config", metavar="YAML", help="original CompVis / SD YAML config (default: detect)"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-hash", action="store_true", help="skip the file's SHA-256 (slow for big files)")


def inspect_checkpoint(path: str, config: str | None = None, *, sha256: bool = True) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint at ``path``; raises the loader's errors."""
    from ldm_sdk.checkpoints.bundle import EMA_META, FIRST_STAGE_PREFIX, UNET_PREFIX
    from ldm_sdk.checkpoints.loader import Partition, check_partition, empty_bundle, resolve_config
    from ldm_sdk.checkpoints.safe_load import read_checkpoint
    from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS

    ckpt = read_checkpoint(path)
    cfg, source = resolve_config(config, ckpt)
    bundle = empty_bundle(cfg)
    part = Partition(bundle, ckpt.tensors)
    check_partition(bundle, part, what=str(ckpt.path))

    def numel(tensors: dict[str, Any]) -> int:
        return sum(int(t.numel()) for t in tensors.values())

    if cfg.unet is None:
        unet, first = {}, part.core
    else:
        unet = {k: v for k, v in part.core.items() if k.startswith(UNET_PREFIX)}
        first = {k: v for k, v in part.core.items() if k.startswith(FIRST_STAGE_PREFIX)}
    parameters = {
        "unet": numel(unet),
        "first_stage": numel(first),
        "cond_stage": numel(part.cond),
        "ema": numel({k: v for k, v in part.ema.items() if k not in EMA_META}),
    }
    parameters["total"] = parameters["unet"] + parameters["first_stage"] + parameters["cond_stage"]
    skip = set(SCHEDULE_BUFFERS) | {"scale_factor"}
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for k, v in part.core.items() if k not in skip)
    scale = float(part.scale_factor.float().item()) if part.scale_factor is not None else bundle.scale_factor
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "reader": ckpt.reader,
        "size_bytes": ckpt.path.stat().st_size,
        "sha256": ckpt.sha256 if sha256 else None,
        "family": cfg.family,
        "config_source": source,
        "global_step": ckpt.global_step,
        "epoch": ckpt.metadata.get("epoch"),
        "parameters": parameters,
        "dtypes": dict(dtypes),
        "first_stage": cfg.first_stage.kind,
        "latent_channels": bundle.latent_channels,
        "downsampling_factor": bundle.downsampling_factor,
        "scale_factor": scale,
        "unet_in_channels": cfg.unet.in_channels if cfg.unet else None,
        "context_dim": cfg.unet.context_dim if cfg.unet else None,
        "conditioning_key": bundle.conditioning_key,
        "parameterization": bundle.parameterization,
        "cond_stage": cfg.cond_stage.target if cfg.cond_stage else None,
        "has_ema": bool(part.ema),
        "skipped_entries": len(part.training),
        "placeholders": list(ckpt.placeholders),
    }


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.checkpoint, args.config, sha256=not args.no_hash)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, soft_wrap=True)
    table = Table(title=info["path"], show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows = [
        ("family", f"{info['family']} (config: {info['config_source']})"),
        ("format", f"{info['format']} (read with {info['reader']})"),
        ("size", f"{info['size_bytes']:,} bytes"),
        ("sha256", info["sha256"] or "(skipped)"),
        ("global step", _text(info["global_step"])),
        (
            "first stage",
            f"{info['first_stage'].upper()}, {info['latent_channels']} latent channels, "
            f"factor {info['downsampling_factor']}, scale {info['scale_factor']:g}",
        ),
        ("conditioning", f"{_text(info['conditioning_key'])}; cond stage {_text(info['cond_stage'])}"),
        ("parameterization", _text(info["parameterization"])),
        ("UNet", f"{_text(info['unet_in_channels'])} input channels, context {_text(info['context_dim'])}"),
        ("EMA weights", "yes" if info["has_ema"] else "no"),
        ("weight dtypes", ", ".join(f"{k} ({v})" for k, v in info["dtypes"].items())),
    ]
    if info["skipped_entries"]:
        rows.append(("skipped", f"{info['skipped_entries']} training-only entries (loss.*)"))
    if info["placeholders"]:
        rows.append(("inert classes", ", ".join(info["placeholders"])))
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)
    counts = Table(title="parameters", title_justify="left")
    counts.add_column("part")
    counts.add_column("values", justify="right")
    for part, n in info["parameters"].items():
        counts.add_row(part, f"{n:,}")
    console.print(counts)
    return 0


def _text(value: object) -> str:
    return "-" if value is None else str(value)
