"""The ``run`` subcommand: logging, one process per GPU, resuming, and the time budget."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from .data import prepare_data
from .fid import STANDIN_WEIGHTS
from .presets import FACTORS, Preset, resolve_preset
from .report import export, write_outputs
from .results import environment, load_results, merge
from .train import Context, run_factor


# -- the driver ---------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} ldm_factors: {message}"
        print(line, file=sys.stderr, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def _context_args(ctx: Context) -> dict[str, Any]:
    return {
        "preset": dataclasses.asdict(ctx.preset),
        "out": str(ctx.out),
        "fid_weights": str(ctx.fid_weights),
        "standin": ctx.standin,
        "lpips_vgg": str(ctx.lpips_vgg) if ctx.lpips_vgg else None,
        "data_paths": ctx.data["paths"],
        "device": ctx.device.type,
    }


def _worker(gpu: int, conn: Any, args: dict[str, Any]) -> None:
    """A worker process (one GPU, or the CPU): runs the factors the parent sends, reporting every update."""
    if args["device"] == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = args["gpu_ids"][
            gpu
        ]  # (the parent set it too) before CUDA starts
    else:
        torch.set_num_threads(1)
    log = Logger(Path(args["out"]) / "run.log")
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["preset"].items()})
    data = {name: torch.load(p) for name, p in args["data_paths"].items()}
    data["paths"] = args["data_paths"]
    device = torch.device("cuda", 0) if args["device"] == "cuda" else torch.device("cpu")
    lpips_vgg = Path(args["lpips_vgg"]) if args["lpips_vgg"] else None
    ctx = Context(
        preset, Path(args["out"]), device, data, Path(args["fid_weights"]), args["standin"], lpips_vgg
    )
    while True:
        job = conn.recv()
        if job is None:
            return
        f, state, deadline = job
        try:
            status = run_factor(
                ctx,
                f,
                state,
                deadline,
                lambda u: conn.send(("update", u)),
                lambda m: log(f"[worker {gpu}] {m}"),
            )
            conn.send(("finished", {"factor": f, "status": status}))
        except Exception:
            conn.send(("error", {"factor": f, "traceback": traceback.format_exc()}))


def run_parallel(
    ctx: Context, factors: list[int], results: dict[str, Any], deadline: float, workers: int, log: Logger
) -> dict[int, str]:
    """One process per GPU; each takes the next factor (most expensive first) and runs all of it."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    mp_ctx = mp.get_context("spawn")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    args = {
        **_context_args(ctx),
        "gpu_ids": visible.split(",") if visible else [str(i) for i in range(workers)],
    }
    procs, conns = [], []
    for gpu in range(workers):
        parent, child = mp_ctx.Pipe()
        proc = mp_ctx.Process(target=_worker, args=(gpu, child, args), daemon=True)
        if ctx.device.type == "cuda":  # the child sees one GPU from its start (inherited environment)
            os.environ["CUDA_VISIBLE_DEVICES"] = args["gpu_ids"][gpu]
        try:
            proc.start()
        finally:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        procs.append(proc)
        conns.append(parent)
    queue = sorted(factors)  # LDM-1 (pixel space) is the longest: start it first
    status: dict[int, str] = {}
    busy: dict[int, int] = {}

    def dispatch(i: int) -> None:
        if queue:
            f = queue.pop(0)
            busy[i] = f
            conns[i].send((f, _factor_state(results, f), deadline))

    for i in range(workers):
        dispatch(i)
    while busy:
        for conn in wait([conns[i] for i in busy]):
            i = conns.index(conn)  # type: ignore[arg-type]
            try:
                kind, payload = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                log(f"worker {i} died while running f={busy[i]}")
                status[busy.pop(i)] = "error"
                continue
            if kind == "update":
                merge(results, payload)
                write_outputs(ctx.out, results)
                continue
            f = busy.pop(i)
            if kind == "error":
                log(f"f={f} failed:\n{payload['traceback']}")
                status[f] = "error"
            else:
                status[f] = payload["status"]
            if status[f] != "deadline":
                dispatch(i)
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.send(None)
    for proc in procs:
        proc.join(timeout=30)
    for f in queue:
        status[f] = "deadline"
    return status


def _factor_state(results: dict[str, Any], f: int) -> dict[str, Any]:
    rec = results["factors"][str(f)]
    ae_walls = [
        r["first_stage"]["wall_s"] + r["first_stage"].get("eval_s", 0)
        for r in results["factors"].values()
        if r["first_stage"].get("wall_s")
    ]
    return {**rec, "expected_ae_s": max(ae_walls) if ae_walls else None}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    preset = resolve_preset(
        args.preset,
        ldm_steps=args.ldm_steps,
        eval_every=args.eval_every,
        ldm_batch=args.batch_size,
        ae_steps=args.ae_steps,
        fid_samples=args.fid_samples,
        precision=args.precision,
        render_workers=args.render_workers,
    )
    budget = args.time_budget if args.time_budget is not None else preset.time_budget_s
    deadline = t_start + budget
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "run.log")
    factors = [int(x) for x in args.factors.split(",")] if args.factors else list(preset.factors)
    bad = [f for f in factors if f not in FACTORS or preset.image_size % f]
    if bad:
        raise ValueError(f"--factors {bad}: valid factors are {list(FACTORS)}")
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and preset.precision == "bf16" and args.precision is None:
        preset = dataclasses.replace(preset, precision="fp32")
    results = load_results(out, preset, Path(args.results_from) if args.results_from else None, log)
    results["environment"] = environment(device)

    # FID weights: the real file, or the stand-in (written once per out dir)
    if args.fid_weights:
        from ldm_sdk.evaluation.generative import check_inception_weights

        weights, standin = check_inception_weights(args.fid_weights), False
    else:
        from ldm_sdk.evaluation.generative import STANDIN_NOTE, write_standin_inception_weights

        weights, standin = out / STANDIN_WEIGHTS, True
        if not weights.is_file():
            write_standin_inception_weights(weights)
        log(f"no --fid-weights: FID with a random stand-in Inception ({STANDIN_NOTE})")
    results["fid"] = {
        "weights": str(weights) if not standin else "random stand-in (seed 0)",
        "standin": standin,
        "note": (
            "computed with a randomly initialised stand-in Inception: NOT comparable with published FIDs"
            if standin
            else "torch-fidelity inception-v3-compat with the given weights"
        ),
        "feature_layer": preset.fid_layer,
        "samples": preset.fid_samples,
        "reference": preset.fid_reference,
    }

    data = prepare_data(preset, out, Path(args.assets) if args.assets else None, log)
    results["data"] = data.pop("summary")
    ctx = Context(
        preset, out, device, data, weights, standin, Path(args.lpips_vgg) if args.lpips_vgg else None
    )
    pending = [f for f in factors if not results["factors"][str(f)]["ldm"]["done"]]
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    asked = args.gpus if args.gpus is not None else n_gpus
    workers = max(1, min(asked, len(pending), n_gpus if device.type == "cuda" else asked))
    results["workers"] = workers
    run = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "factors": pending,
        "workers": workers,
        "budget_s": budget,
        "environment": results["environment"],
    }
    results["runs"].append(run)
    write_outputs(out, results)
    log(f"preset {preset.name}: factors {pending} on {workers} worker(s), {device}, budget {budget:.0f}s")

    status: dict[int, str] = {}

    def emit(update: dict[str, Any]) -> None:
        merge(results, update)
        write_outputs(out, results)

    try:
        if workers > 1:
            status = run_parallel(ctx, pending, results, deadline, workers, log)
        else:
            for f in pending:
                try:
                    status[f] = run_factor(ctx, f, _factor_state(results, f), deadline, emit, log)
                except Exception:
                    log(f"f={f} failed:\n{traceback.format_exc()}")
                    status[f] = "error"
                if status[f] == "deadline":
                    status.update({g: "deadline" for g in pending if g not in status})
                    break
    finally:
        run["status"] = {str(f): s for f, s in status.items()}
        run["wall_s"] = time.time() - t_start
        write_outputs(out, results)
        left = [f for f in pending if status.get(f) != "done"]
        if left:
            log(f"done in {run['wall_s']:.0f}s; unfinished: {left} (run again with the same --out-dir)")
        else:
            log(f"done in {run['wall_s']:.0f}s; all factors finished")
        if args.export:
            export(out, Path(args.export))
    return results
