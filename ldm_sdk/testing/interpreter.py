"""Run a test file's checks under the Triton interpreter: the fused kernels' CPU tests.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so a test module that checks real kernels on
the CPU runs *itself* as a script in a fresh process with the variable set; the script prints its result as
JSON on its last line. :func:`run_interpreted` does the process part and returns that result;
:func:`unwritten_memory_is_nan` makes outputs a kernel forgot to write visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def run_interpreted(script: str | Path, *args: str, timeout: float = 600) -> Any:
    """Run ``python script *args`` with ``TRITON_INTERPRET=1`` and the repository root (the folder holding
    ``ldm_sdk``) first on ``PYTHONPATH``; return the JSON value of its last stdout line. Raises
    ``AssertionError`` with the output's tail when the script fails."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
    }
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"interpreter checks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def unwritten_memory_is_nan() -> Iterator[None]:
    """``torch.empty`` / ``empty_like`` fill floating tensors with NaN meanwhile, so an output element or
    a statistics partial a kernel forgets to write shows up as NaN instead of as stale zeros."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t: Tensor) -> Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: nan(empty(*a, **k))  # type: ignore[assignment]
    torch.empty_like = lambda *a, **k: nan(empty_like(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like  # type: ignore[assignment]


__all__ = ["run_interpreted", "unwritten_memory_is_nan"]
