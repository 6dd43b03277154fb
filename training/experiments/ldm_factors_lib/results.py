"""The results file: environment, creation, loading/merging earlier results, and the per-factor summary."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .architectures import design_unet, latent_size, training_flops
from .presets import FACTORS, LATENT_CHANNELS, MAY_CHANGE, Preset, preset_json
from .train import factor_dir

REPO = Path(__file__).resolve().parents[3]
RESULTS_VERSION = 1


# -- results ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    env["git_commit"] = os.environ.get("LDM_FACTORS_COMMIT", "?")  # a checkout copy may have no .git
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    return env


def new_results(preset: Preset) -> dict[str, Any]:
    designs = {str(f): design_unet(preset, f) for f in FACTORS if preset.image_size % f == 0}
    return {
        "version": RESULTS_VERSION,
        "experiment": "ldm_factors (LDM paper section 4.1 at small scale)",
        "preset": preset_json(preset),
        "factors": {
            k: {
                "factor": int(k),
                "latent_shape": [LATENT_CHANNELS[int(k)], *[latent_size(preset, int(k))] * 2],
                "unet": {
                    "params": d.params,
                    "target": d.target,
                    "rel_diff": d.rel_diff,
                    "config": json.loads(d.config.model_dump_json()),
                },
                "flops": training_flops(preset, int(k), d.config),
                "first_stage": {"done": True, "placeholder": True} if k == "1" else {},
                "ldm": {"segments": [], "done": False},
            }
            for k, d in designs.items()
        },
        "runs": [],
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def load_results(
    out: Path, preset: Preset, seed_from: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """The results of this out dir (or ``seed_from``, or new), checked against ``preset`` and against the
    checkpoints that are really there: an unfinished factor without its checkpoint starts over."""
    path = out / "results.json"
    source = path if path.is_file() else seed_from
    if source is None or not source.is_file():
        return new_results(preset)
    results = json.loads(source.read_text(encoding="utf-8"))
    fresh = new_results(preset)
    old = results.get("preset", {})
    changed = sorted(k for k in fresh["preset"] if k not in MAY_CHANGE and old.get(k) != fresh["preset"][k])
    if changed:
        raise ValueError(
            f"{source} was written with other settings ({', '.join(changed)}); use another --out-dir or the "
            f"same preset and overrides (only {', '.join(sorted(MAY_CHANGE))} may change between calls)"
        )
    results["preset"] = fresh["preset"]
    for k, rec in results["factors"].items():
        f = int(k)
        ldm = rec["ldm"]
        ldm["done"] = bool(ldm["segments"]) and ldm["segments"][-1]["step"] >= preset.ldm_steps
        has_ckpt = (factor_dir(out, "ldm", f) / "last.ckpt").is_file()
        if ldm["segments"] and not ldm["done"] and not has_ckpt:
            log(
                f"f={f}: {len(ldm['segments'])} evaluated segment(s) but no checkpoint here: starting it over"
            )
            results.setdefault("discarded", []).append({"factor": f, "ldm": ldm})
            rec["ldm"] = {"segments": [], "done": False}
        fs = rec["first_stage"]
        if f > 1 and fs.get("done") and not rec["ldm"]["done"] and not (out / fs["export"]).is_file():
            log(f"f={f}: first stage recorded but its weights are not here: training it again")
            rec["first_stage"] = {}
    return results


def merge(results: dict[str, Any], update: dict[str, Any]) -> None:
    rec = results["factors"][str(update["factor"])]
    if "first_stage" in update:
        rec["first_stage"] = update["first_stage"]
    if "segment" in update:
        rec["ldm"]["segments"].append(update["segment"])
    if update.get("ldm_done"):
        rec["ldm"]["done"] = True


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per factor: throughput (median over segments), wall clock, FID at each evaluated step."""
    rows = []
    base = None
    for k in sorted(results["factors"], key=int):
        rec = results["factors"][k]
        segs = rec["ldm"]["segments"]
        rates = sorted(s["samples_per_s"] for s in segs if s.get("samples_per_s"))
        its = sorted(s["it_per_s"] for s in segs if s.get("it_per_s"))
        row = {
            "factor": int(k),
            "latent_shape": rec["latent_shape"],
            "unet_params": rec["unet"]["params"],
            "unet_rel_diff": rec["unet"]["rel_diff"],
            "first_stage": rec["first_stage"],
            "step": segs[-1]["step"] if segs else 0,
            "done": rec["ldm"]["done"],
            "samples_per_s": rates[len(rates) // 2] if rates else None,
            "it_per_s": its[len(its) // 2] if its else None,
            "train_wall_s": sum(s["train_wall_s"] for s in segs),
            "sample_images_per_s": segs[-1].get("sample_images_per_s") if segs else None,
            "devices": sorted({s.get("device", "?") for s in segs}),
            "fid": {s["step"]: s["fid"] for s in segs},
        }
        if row["factor"] == 1:
            base = row["samples_per_s"]
        rows.append(row)
    for row in rows:
        row["speedup_vs_f1"] = row["samples_per_s"] / base if base and row["samples_per_s"] else None
    return rows
