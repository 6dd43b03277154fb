"""The kernel package ``ldm_sdk.kernels`` stays torch-free and holds every kernel the accel modules launch.

The package exists so that a compile worker (``python -m ldm_sdk.kernels.compile_workers``) imports Triton and
the kernels without torch. Checked against a fresh interpreter (a subprocess: this one has torch loaded):

- importing every module of ``ldm_sdk.kernels`` (found with ``pkgutil``, so a new module is covered) and the
  worker's warm imports (``WARM_IMPORTS``) loads no ``torch``;
- a worker's compile of a real variant (``compile_job`` on the row-softmax kernel, for sm_90 through the
  compile-only driver; no GPU needed) succeeds, and loads no ``torch`` either (the launcher step runs
  under the stand-in driver too: Triton's real one would probe every back end, and the AMD probe imports
  torch).

And in this process, against the launching modules: every Triton JIT function found in the namespace of an
``ldm_sdk.accel`` module was defined in an ``ldm_sdk.kernels`` module (so a worker can import it without
torch), and every JIT function of a kernel module is reachable under its qualified name
(what the worker's ``getattr(module, name)`` needs: ``jit_function`` names it).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.jit import JITFunction

import ldm_sdk.accel
import ldm_sdk.kernels
from ldm_sdk.kernels.compile_workers import (
    KernelJob,
    Target,
    compile_only_driver,
    jit_function,
    specialization_of,
)

REPO = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO / "ldm_sdk" / "kernels"


def run_fresh(code: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter with the repository importable; its last stdout line, as JSON."""
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=stdin,
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import ldm_sdk.kernels as kernels
from ldm_sdk.kernels.compile_workers import WARM_IMPORTS
names = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))
torch_after = []  # the imports after which torch was loaded
for module in ["ldm_sdk.kernels." + name for name in names] + list(WARM_IMPORTS):
    importlib.import_module(module)
    if "torch" in sys.modules:
        torch_after.append(module)
print(json.dumps({"modules": names, "torch_after": torch_after}))
"""


def test_kernel_modules_import_without_torch() -> None:
    report = run_fresh(IMPORT_ALL)
    on_disk = sorted(p.stem for p in KERNELS_DIR.glob("*.py") if p.stem != "__init__")
    assert report["modules"] == on_disk  # pkgutil found every module (the loop was not empty)
    assert "row_softmax" in report["modules"] and "compile_workers" in report["modules"]
    assert report["torch_after"] == [], "torch loaded"


COMPILE_ONE = """
import json, sys, traceback
class WatchTorch:  # records where torch is first imported from
    stack = None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and WatchTorch.stack is None:
            WatchTorch.stack = traceback.format_stack(limit=12)
        return None
sys.meta_path.insert(0, WatchTorch())
from ldm_sdk.kernels.compile_workers import KernelJob, compile_job
result = compile_job(KernelJob.from_json(sys.stdin.read()))
report = {"ok": result.ok, "error": result.error, "launcher": result.launcher}
report.update(torch="torch" in sys.modules, torch_stack="".join(WatchTorch.stack or []))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def worker_compile(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """``compile_job`` of a real variant (row softmax, BLOCK 512, sm_90) in a fresh interpreter with an empty
    Triton cache: its report, and the cache folder."""
    from ldm_sdk.kernels.row_softmax import _softmax_rows_kernel as kernel

    cache = tmp_path_factory.mktemp("triton-cache")
    target = Target("cuda", 90, 32, 0)
    with pytest.MonkeyPatch.context() as mp:
        # an empty in-process cache (restored afterwards): Triton asks for a variant's specialization only
        # when this process has not compiled it, and keeps per device the target it first compiled for
        mp.setattr(kernel, "device_caches", defaultdict(kernel.create_binder))
        with compile_only_driver(target):
            spec = specialization_of(kernel, (torch.float16, 512), (16,), {"BLOCK": 512, "num_warps": 2})
    name = jit_function(kernel)
    assert spec is not None and name is not None
    job = KernelJob(*name, spec, target)
    return run_fresh(COMPILE_ONE, stdin=job.to_json(), env={"TRITON_CACHE_DIR": str(cache)}), cache


def test_worker_compiles_a_variant_without_the_parent(worker_compile: tuple[dict[str, Any], Path]) -> None:
    report, cache = worker_compile
    assert report["ok"], report["error"]
    assert list(cache.rglob("_softmax_rows_kernel.cubin"))


def test_worker_compile_imports_no_torch(worker_compile: tuple[dict[str, Any], Path]) -> None:
    report, _ = worker_compile
    assert report["torch"] is False, f"torch imported by:\n{report['torch_stack']}"


def _jit_functions(module: Any) -> dict[str, JITFunction]:
    return {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}


def test_accel_kernels_are_defined_in_the_kernel_package() -> None:
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(ldm_sdk.accel.__path__):
        module = importlib.import_module(f"ldm_sdk.accel.{info.name}")
        for name, fn in _jit_functions(module).items():
            found[f"{module.__name__}.{name}"] = fn.fn.__module__
    assert "ldm_sdk.accel.row_softmax._softmax_rows_kernel" in found  # the search sees the kernels
    outside = {at: defined for at, defined in found.items() if not defined.startswith("ldm_sdk.kernels.")}
    assert not outside, f"JIT functions defined outside ldm_sdk.kernels: {outside}"


def test_kernel_module_functions_are_importable_by_name() -> None:
    count = 0
    for info in pkgutil.iter_modules(ldm_sdk.kernels.__path__):
        module = importlib.import_module(f"ldm_sdk.kernels.{info.name}")
        for name, fn in _jit_functions(module).items():
            if fn.fn.__module__ != module.__name__:
                continue  # imported from another kernel module: checked there
            count += 1
            assert jit_function(fn) == (module.__name__, name)
            assert getattr(importlib.import_module(module.__name__), name) is fn
    assert count > 0
