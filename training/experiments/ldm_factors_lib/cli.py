"""The command line: ``params``, ``pack-assets``, ``report`` and the argument parser."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .architectures import UNetDesign, design_unet, latent_size, training_flops
from .presets import FACTORS, LATENT_CHANNELS, PRESETS, Preset, resolve_preset
from .report import DOC_BEGIN, DOC_END, plot_results, results_markdown, write_csv
from .run import cmd_run


# -- other commands -----------------------------------------------------------------------------------------
def params_table(preset: Preset) -> tuple[list[UNetDesign], str]:
    """The matched UNets of ``preset`` and a Markdown table of them."""
    designs = [design_unet(preset, f) for f in FACTORS]
    lines = [
        f"Preset `{preset.name}`: {preset.image_size} px, target {designs[0].target:,} UNet parameters "
        f"(the f=1 reference), tolerance {preset.param_tolerance:.0%}.",
        "",
        "| f | latent | model_channels | channel_mult | res blocks | depth | attention (ds) | UNet params "
        "| vs f=1 | GFLOP/sample (UNet fwd, encoder, train) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in designs:
        c, s = d.config, latent_size(preset, d.factor)
        fl = training_flops(preset, d.factor, c)
        cells = [
            str(d.factor),
            f"{LATENT_CHANNELS[d.factor]}x{s}x{s}",
            str(c.model_channels),
            str(tuple(c.channel_mult)),
            str(c.num_res_blocks),
            str(c.transformer_depth),
            str(tuple(c.attention_resolutions)),
            f"{d.params:,}",
            f"{d.rel_diff:+.1%}",
            f"{fl['unet_fwd_gflop']:.2f}, {fl['encoder_gflop']:.2f}, {fl['train_gflop']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return designs, "\n".join(lines)


#: the parser's description: the first line of the ldm_factors.py script's docstring
DESCRIPTION = (
    "LDM-{1,2,4,8,16}: the perceptual-compression trade-off of the LDM paper (section 4.1) at small scale."
)


def cmd_params(args: argparse.Namespace) -> list[UNetDesign]:
    designs, table = params_table(resolve_preset(args.preset))
    print(table)
    return designs


def cmd_pack_assets(args: argparse.Namespace) -> Path:
    """Copy the emoji font and a clip-art subset (sampled by path hash under a size cap, same relative paths,
    so same splits) into one folder to carry to a machine without the Debian packages."""
    from ldm_sdk.training.data.clipart import CLIPART_ROOT
    from ldm_sdk.training.data.emoji import EMOJI_FONT

    out = Path(args.out)
    (out / "clipart").mkdir(parents=True, exist_ok=True)
    shutil.copy2(EMOJI_FONT, out / "NotoColorEmoji.ttf")
    root = Path(os.path.realpath(CLIPART_ROOT))
    files = sorted(
        (p for p in root.rglob("*.png") if p.is_file() and not p.is_symlink()),
        key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest(),
    )
    budget, total, n = args.clipart_mb * 1e6, 0, 0
    for p in files:
        size = p.stat().st_size
        if size > args.max_file_kb * 1e3 or total + size > budget:
            continue
        dest = out / "clipart" / p.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
        total += size
        n += 1
    print(f"{out}: emoji font + {n} clip-art files ({total / 1e6:.1f} MB)")
    return out


def cmd_report(args: argparse.Namespace) -> str:
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    if args.docs and results["preset"]["name"] == "smoke" and not args.allow_smoke:
        raise ValueError(f"{args.results} is a smoke run: its numbers do not belong in {args.docs}")
    table = results_markdown(results)
    figures = Path(args.figures)
    src = Path(args.results).parent
    fig = plot_results(results, figures / "ldm_factors.png")
    written = [fig]
    if (src / "ldm_factors_samples.png").is_file():
        written.append(
            Path(shutil.copy2(src / "ldm_factors_samples.png", figures / "ldm_factors_samples.png"))
        )
    write_csv(results, figures / "ldm_factors_fid.csv")
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text(encoding="utf-8")
        if DOC_BEGIN not in text or DOC_END not in text:
            raise ValueError(f"{doc} has no {DOC_BEGIN} ... {DOC_END} block to fill")
        rel = os.path.relpath(figures, doc.parent)
        block = (
            f"{DOC_BEGIN}\n{table}\n![FID vs steps and throughput]({rel}/ldm_factors.png)\n"
            + (
                f"\n![Samples, LDM-1 (top) to LDM-16]({rel}/ldm_factors_samples.png)\n"
                if len(written) > 1
                else ""
            )
            + f"\nPer-evaluation numbers: [{rel}/ldm_factors_fid.csv]({rel}/ldm_factors_fid.csv).\n{DOC_END}"
        )
        head, rest = text.split(DOC_BEGIN, 1)
        doc.write_text(head + block + rest.split(DOC_END, 1)[1], encoding="utf-8")
    print(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm_factors", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate (continues an earlier run in the same --out-dir)")
    run.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    run.add_argument("--out-dir", default="out/ldm_factors")
    run.add_argument("--factors", help="comma-separated subset of 1,2,4,8,16 (default: the preset's)")
    run.add_argument(
        "--fid-weights", help="FID Inception weights (pt_inception-2015-12-05); default: stand-in"
    )
    run.add_argument("--lpips-vgg", help="VGG16 weights: adds the LPIPS term to the autoencoders' loss")
    run.add_argument("--assets", help="folder from pack-assets (default: the Debian packages' files)")
    run.add_argument("--results-from", help="results.json of an earlier call, for a fresh --out-dir")
    run.add_argument("--time-budget", type=float, help="seconds after which no new unit starts")
    run.add_argument("--export", help="copy results, table, figures and log here at the end (e.g. $OUT)")
    run.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    run.add_argument("--gpus", type=int, help="worker processes, one per GPU (default: all GPUs)")
    run.add_argument("--ldm-steps", type=int)
    run.add_argument("--eval-every", type=int)
    run.add_argument("--batch-size", type=int, help="LDM batch size")
    run.add_argument("--ae-steps", type=int)
    run.add_argument("--fid-samples", type=int)
    run.add_argument("--precision", choices=("fp32", "bf16"))
    run.add_argument("--render-workers", type=int, help="processes that render the scenes (0: in-process)")
    params = sub.add_parser("params", help="the matched UNets of a preset and their parameter counts")
    params.add_argument("--preset", default="h100", choices=sorted(PRESETS))
    pack = sub.add_parser("pack-assets", help="copy the scene assets into a folder to carry")
    pack.add_argument("--out", default="out/ldm_factors_assets")
    pack.add_argument("--clipart-mb", type=float, default=20.0)
    pack.add_argument("--max-file-kb", type=float, default=48.0)
    report = sub.add_parser("report", help="table and figures from a results.json (optionally into the docs)")
    report.add_argument("--results", required=True)
    report.add_argument("--figures", default="docs/figures")
    report.add_argument("--docs", help="Markdown file whose results block to replace (docs/experiments.md)")
    report.add_argument("--allow-smoke", action="store_true", help="let a smoke run fill --docs (tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "run": cmd_run,
        "params": cmd_params,
        "pack-assets": cmd_pack_assets,
        "report": cmd_report,
    }
    return commands[args.command](args)
