"""Reporting: the markdown table, CSV, figures, sample sheet, and the files a run writes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from .results import summarize, write_json
from .train import factor_dir

DOC_BEGIN = "<!-- ldm-factors:results:begin -->"
DOC_END = "<!-- ldm-factors:results:end -->"


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def results_markdown(results: dict[str, Any]) -> str:
    p = results["preset"]
    rows = summarize(results)
    fid = results.get("fid", {})
    env = results.get("environment", {})
    workers = results.get("workers", 1)
    steps = sorted({s for r in rows for s in r["fid"]})
    reached = {r["factor"]: r["step"] for r in rows}
    if len(set(reached.values())) == 1:
        trained = f"{next(iter(reached.values()))} steps"
    else:  # the step count was lowered between calls (--ldm-steps): say what each factor reached
        trained = ", ".join(f"LDM-{f} {n}" for f, n in sorted(reached.items()))
        trained = f"steps ({trained})"
    device = env.get("gpu", env.get("device", "?")) + (f" x{workers} workers" if workers > 1 else "")
    commit = str(env.get("git_commit", "?"))[:10]
    if fid.get("standin", True):
        weights = (
            "**Stand-in Inception (random weights): these values are NOT comparable with published FIDs**; "
            "they only rank the factors against each other."
        )
    else:
        weights = f"Inception weights: `{fid.get('weights')}`."
    lines = [
        f"Preset `{p['name']}`: {p['image_size']} px scenes, {trained} x batch "
        f"{p['ldm_batch']}, {p['precision']}; device {device}, torch {env.get('torch', '?')}, "
        f"commit {commit}, {env.get('date', '?')}.",
        "",
        f"FID: {fid.get('samples', p['fid_samples'])} DDIM-{p['ddim_steps']} samples (EMA weights, no "
        f"guidance) against {p['ref_images']} held-out scenes ({p['fid_reference']}), Inception layer "
        f"{p['fid_layer']}. {weights}",
        "",
        "| f | latent | first stage (params, PSNR, rFID) | UNet params (vs f=1) | it/s | samples/s "
        "| speed-up vs f=1 | train wall (s) | sampling img/s | step | "
        + " | ".join(f"FID@{s}" for s in steps)
        + " |",
        "|" + "---|" * (10 + len(steps)),
    ]
    devices = sorted({d for r in rows for d in r["devices"]})
    if len(devices) > 1:
        lines.insert(
            4,
            f"**Measured on different devices ({', '.join(devices)}): compare throughput only between "
            "factors measured on the same one (results.json says which).**\n",
        )
    for r in rows:
        fs = r["first_stage"]
        if r["factor"] == 1:
            first = "none (pixel space)"
        elif fs.get("done"):
            first = f"{fs['params'] / 1e6:.2f}M, {fs['psnr_db']:.2f} dB, {fs['rfid']:.3g}"
        else:
            first = "not trained yet"
        shape = "x".join(str(v) for v in r["latent_shape"])
        step = f"{r['step']}" + ("" if r["done"] else " (running)" if r["step"] else " (not run)")
        unet = f"{r['unet_params'] / 1e6:.2f}M ({r['unet_rel_diff']:+.1%})"
        cells = [
            str(r["factor"]),
            shape,
            first,
            unet,
            _fmt(r["it_per_s"], ".2f"),
            _fmt(r["samples_per_s"], ".0f"),
            _fmt(r["speedup_vs_f1"], ".2f"),
            _fmt(r["train_wall_s"] or None, ".0f"),
            _fmt(r["sample_images_per_s"], ".0f"),
            step,
            *(_fmt(r["fid"].get(s), ".3g") for s in steps),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: dict[str, Any], path: Path) -> Path:
    lines = ["factor,step,fid,samples_per_s,it_per_s,train_wall_s,cumulative_train_s"]
    for k in sorted(results["factors"], key=int):
        total = 0.0
        for s in results["factors"][k]["ldm"]["segments"]:
            total += s["train_wall_s"]
            lines.append(
                f"{k},{s['step']},{s['fid']:.6g},{s.get('samples_per_s', '')},{s.get('it_per_s', '')},"
                f"{s['train_wall_s']:.3f},{total:.3f}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- figures ------------------------------------------------------------------------------------------------
COLORS = {1: "#1f77b4", 2: "#ff7f0e", 4: "#2ca02c", 8: "#d62728", 16: "#9467bd"}


Curve = list[tuple[float, float]]


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Three panels as one PNG: FID vs training steps, FID vs cumulative training wall-clock (one line per
    factor), and training throughput per factor. matplotlib when installed, else a plain PIL drawing."""
    by_step: dict[int, Curve] = {}
    by_time: dict[int, Curve] = {}
    for k, rec in results["factors"].items():
        total, steps, times = 0.0, [], []
        for seg in rec["ldm"]["segments"]:
            total += seg["train_wall_s"]
            steps.append((float(seg["step"]), seg["fid"]))
            times.append((total, seg["fid"]))
        if steps:
            by_step[int(k)], by_time[int(k)] = steps, times
    speed = {r["factor"]: r["samples_per_s"] for r in summarize(results) if r["samples_per_s"]}
    label = "FID (stand-in Inception)" if results.get("fid", {}).get("standin", True) else "FID"
    panels = [
        ("sample quality vs steps", "training step", by_step),
        ("sample quality vs training time", "training wall-clock (s)", by_time),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(panels, speed, label, path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, xlabel, curves) in zip(axes, panels, strict=False):
        for f, pts in sorted(curves.items()):
            ax.plot([x for x, _ in pts], [v for _, v in pts], "o-", color=COLORS[f], label=f"LDM-{f}")
        ax.set(title=title, xlabel=xlabel, ylabel=label)
        if curves:
            ax.legend()
    fs = sorted(speed)
    axes[2].bar([f"LDM-{f}" for f in fs], [speed[f] for f in fs], color=[COLORS[f] for f in fs])
    axes[2].set(title="training throughput", ylabel="training samples / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_pil(
    panels: list[tuple[str, str, dict[int, Curve]]], speed: dict[int, float], label: str, path: Path
) -> Path:
    from PIL import Image, ImageDraw

    W, H, pad, n_panels = 1500, 420, 60, len(panels) + 1
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    width = W // n_panels

    def axes(i: int, title: str, ylabel: str) -> tuple[int, int, int, int]:
        x0 = i * width
        box = (x0 + pad, 40, x0 + width - 20, H - pad)
        dr.rectangle(box, outline="black")
        dr.text((x0 + pad, 12), title, fill="black")
        dr.text((x0 + 5, 25), ylabel, fill="black")
        return box

    for i, (title, xlabel, curves) in enumerate(panels):
        box = axes(i, title, label)
        pts = [pt for c in curves.values() for pt in c]
        if not pts:
            continue
        x_hi = max(x for x, _ in pts) or 1.0
        y_lo, y_hi = min(0.0, min(v for _, v in pts)), max(v for _, v in pts) or 1.0

        def xy(
            x: float,
            v: float,
            box: tuple[int, int, int, int] = box,
            lim: tuple[float, ...] = (x_hi, y_lo, y_hi),
        ) -> tuple[float, float]:
            return (
                box[0] + x / lim[0] * (box[2] - box[0]),
                box[3] - (v - lim[1]) / ((lim[2] - lim[1]) or 1.0) * (box[3] - box[1]),
            )

        for j, (f, c) in enumerate(sorted(curves.items())):
            if len(c) > 1:
                dr.line([xy(x, v) for x, v in c], fill=COLORS[f], width=2)
            for x, v in c:
                cx, cy = xy(x, v)
                dr.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=COLORS[f])
            dr.text((box[2] - 60, box[1] + 8 + 14 * j), f"LDM-{f}", fill=COLORS[f])
        dr.text((box[0], box[3] + 5), f"{xlabel}: 0 .. {x_hi:.4g}", fill="black")
        dr.text((box[0] - 55, box[1]), f"{y_hi:.3g}", fill="black")
        dr.text((box[0] - 55, box[3] - 10), f"{y_lo:.3g}", fill="black")
    box = axes(len(panels), "training throughput (samples/s)", "")
    if speed:
        top = max(speed.values())
        bar = (box[2] - box[0]) / (2 * len(speed) + 1)
        for i, f in enumerate(sorted(speed)):
            x = box[0] + bar * (2 * i + 1)
            y = box[3] - speed[f] / top * (box[3] - box[1] - 20)
            dr.rectangle((x, y, x + bar, box[3]), fill=COLORS[f])
            dr.text((x, box[3] + 5), f"LDM-{f}", fill="black")
            dr.text((x, y - 12), f"{speed[f]:.0f}", fill="black")
    img.save(path)
    return path


def sample_sheet(out: Path, results: dict[str, Any], path: Path) -> Path | None:
    """The last sample grid of every factor, one row each (LDM-1 at the top)."""
    from PIL import Image

    rows = []
    for k in sorted(results["factors"], key=int):
        grids = sorted((factor_dir(out, "ldm", int(k)) / "samples").glob("step-*.png"))
        if grids:
            with Image.open(grids[-1]) as im:
                rows.append(im.convert("RGB").copy())
    if not rows:
        return None
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """results.json first; the table, CSV and figures after it, none of them able to stop a run."""
    write_json(out / "results.json", results)
    for name, write in (
        ("results.md", lambda: (out / "results.md").write_text(results_markdown(results), encoding="utf-8")),
        ("fid_curves.csv", lambda: write_csv(results, out / "fid_curves.csv")),
        ("ldm_factors.png", lambda: plot_results(results, out / "ldm_factors.png")),
        ("ldm_factors_samples.png", lambda: sample_sheet(out, results, out / "ldm_factors_samples.png")),
    ):
        try:
            write()
        except Exception as exc:  # a figure must not cost the experiment
            print(f"ldm_factors: could not write {name}: {exc!r}", file=sys.stderr, flush=True)


def export(out: Path, dest: Path) -> list[Path]:
    """Copy the small outputs (at most 8 files, each well under 16 MiB) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("results.json", "results.md", "fid_curves.csv", "ldm_factors.png", "ldm_factors_samples.png",
                 "run.log"):  # fmt: skip
        if (out / name).is_file():
            copied.append(Path(shutil.copy2(out / name, dest / name)))
    return copied
