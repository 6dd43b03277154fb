"""``ldm-sdk eval``: generative and reconstruction metrics of image folders, as JSON.

    ldm-sdk eval --fid REAL_DIR FAKE_DIR --weights inception.pth [--kid --isc --prc]
    ldm-sdk eval --recon REAL_DIR RECON_DIR [--lpips-weights vgg16.pth --lpips-net vgg]

Both may be given at once. No pretrained network exists offline and none is downloaded: ``--fid`` needs
``--weights`` (torch-fidelity's ``inception-v3-compat`` weights file), LPIPS runs only with
``--lpips-weights`` (a torchvision VGG16 / AlexNet file). ``--standin`` marks the result as computed with
stand-in weights (tests): those values are not comparable with published ones. The JSON goes to stdout
and, with ``--output``, to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HELP = "FID/IS/KID/precision-recall and PSNR/SSIM/LPIPS of image folders, as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fid", nargs=2, metavar=("REAL_DIR", "FAKE_DIR"), help="generative metrics")
    parser.add_argument("--weights", metavar="PATH", help="inception-v3-compat weights (needed by --fid)")
    parser.add_argument("--kid", action="store_true", help="also KID (with --fid)")
    parser.add_argument(
        "--isc", action="store_true", help="also the Inception Score of FAKE_DIR (with --fid)"
    )
    parser.add_argument("--prc", action="store_true", help="also precision / recall (with --fid)")
    parser.add_argument("--resize", type=int, default=0, metavar="PX", help="resize + centre-crop (--fid)")
    parser.add_argument("--recon", nargs=2, metavar=("REAL_DIR", "RECON_DIR"), help="PSNR / SSIM / LPIPS")
    parser.add_argument("--lpips-weights", metavar="PATH", help="LPIPS trunk weights (torchvision format)")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg", help="LPIPS trunk")
    parser.add_argument("--per-image", action="store_true", help="keep per-image values of --recon")
    parser.add_argument("--standin", action="store_true", help="mark values as from stand-in weights")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of --fid")
    parser.add_argument(
        "--feature-layer",
        choices=("2048", "768", "192", "64"),
        default="2048",
        help="Inception features of --fid/--kid/--prc (2048: the standard; others only for quick checks)",
    )
    parser.add_argument("--no-workers", action="store_true", help="--fid: load images in this process")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")


def _finite(value: Any) -> Any:
    """JSON has no inf / nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    if not args.fid and not args.recon:
        raise ValueError(
            "nothing to evaluate: give --fid REAL_DIR FAKE_DIR and/or --recon REAL_DIR RECON_DIR"
        )
    if (args.kid or args.isc or args.prc) and not args.fid:
        raise ValueError("--kid, --isc and --prc go with --fid REAL_DIR FAKE_DIR")
    result: dict[str, Any] = {}
    if args.fid:
        from ldm_sdk.evaluation.generative import STANDIN_NOTE, generative_metrics

        real, fake = args.fid
        result["generative"] = generative_metrics(
            real,
            fake,
            weights=args.weights,
            kid=args.kid,
            isc=args.isc,
            prc=args.prc,
            device=args.device,
            batch_size=args.batch_size,
            resize=args.resize,
            workers=not args.no_workers,
            feature_layer=args.feature_layer,
        )
        result["generative"].update(
            {"real": real, "fake": fake, "weights": args.weights, "feature_layer": args.feature_layer}
        )
        if args.standin:
            result["generative"]["note"] = STANDIN_NOTE
    if args.recon:
        from ldm_sdk.evaluation.reconstruction import STANDIN_TRUNK_NOTE, reconstruction_metrics

        real, recon = args.recon
        metrics = reconstruction_metrics(
            real, recon, lpips_weights=args.lpips_weights, lpips_net=args.lpips_net, device=args.device
        )
        if not args.per_image:
            metrics.pop("per_image")
        metrics.update({"real": real, "recon": recon})
        if args.lpips_weights is None:
            metrics["lpips"] = None
            metrics["lpips_note"] = "LPIPS skipped: no --lpips-weights (no pretrained trunk exists offline)"
        elif args.standin:
            metrics["lpips_note"] = STANDIN_TRUNK_NOTE
        result["reconstruction"] = metrics
    text = json.dumps(_finite(result), indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    sys.stdout.flush()
    return 0
