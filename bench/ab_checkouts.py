"""A/B of two checkouts of the project on one machine: a bench script run from each in turn, in fresh
processes, round after round (so drift between rounds shows in both), the JSON each run writes collected.

    python bench/ab_checkouts.py --base /path/to/other/checkout --rounds 2 --out ab.json \\
        -- bench/cold_start.py
    python bench/ab_checkouts.py --base ../base --out ab.json \\
        -- bench/ablate_graph_kernels.py --variants current

The script (a path relative to a checkout's root) runs as ``python ROOT/script ARGS --out FILE`` with
``ROOT`` first on ``PYTHONPATH``, so each run imports its own checkout's ``ldm_sdk``; the ``--base``
checkouts (``PATH`` or ``NAME=PATH``, repeatable) run first in every round, in the order given, then this
one (``head``). Each checkout is named by ``git describe`` where it is a git work tree, else by its path.
What a change costs or saves is then the difference between the two lists of results, measured in
alternation rather than in two sessions on different machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def describe(root: Path) -> str:
    """``git describe --always --dirty`` of ``root``, or its path where it is not a git work tree."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return str(root)
    return out.stdout.strip() or str(root)


def run_once(root: Path, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    """One run of ``script`` from ``root``: its JSON output, or what went wrong."""
    path = root / script
    if not path.is_file():
        raise FileNotFoundError(f"{script} is not in the checkout {root}")
    with tempfile.TemporaryDirectory(prefix="ab_checkouts_") as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(path), *args, "--out", str(out)],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            return {
                "error": f"exit {proc.returncode}",
                "log": (proc.stdout + proc.stderr)[-4000:],
                "wall_s": wall,
            }
        return {"result": json.loads(out.read_text()), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--base",
        action="append",
        required=True,
        help="another checkout (its root folder), as PATH or NAME=PATH; repeat it to compare several",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("script", help="the bench script, relative to a checkout's root")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    ns = p.parse_args(argv)
    if ns.rounds < 1:
        p.error(f"--rounds must be >= 1, got {ns.rounds}")
    checkouts: dict[str, Path] = {}
    for i, spec in enumerate(ns.base):
        name, sep, path = spec.rpartition("=")
        if not sep:
            name = "base" if len(ns.base) == 1 else f"base{i + 1}"
        root = Path(path).resolve()
        if not (root / "ldm_sdk").is_dir():
            p.error(f"--base {root} is not a checkout of the project (no ldm_sdk/ folder)")
        if name in checkouts or name == "head":
            p.error(f"--base name {name!r} is used twice ('head' is this checkout)")
        checkouts[name] = root
    checkouts["head"] = ROOT
    args = [a for a in ns.args if a != "--"]
    res: dict[str, Any] = {
        "script": ns.script,
        "args": args,
        "checkouts": {name: describe(root) for name, root in checkouts.items()},
        "runs": {name: [] for name in checkouts},
    }
    for r in range(ns.rounds):
        for name, root in checkouts.items():
            run = run_once(root, ns.script, args, ns.timeout)
            res["runs"][name].append(run)
            print(f"round {r + 1} {name}: {run.get('error', 'ok')} in {run['wall_s']:.1f} s", flush=True)
            if ns.out:  # after every run: a command cut short keeps what it measured
                ns.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
