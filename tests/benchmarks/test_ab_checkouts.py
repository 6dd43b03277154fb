"""``bench/ab_checkouts.py``: the bench script runs from each checkout in turn (base first in every round),
in a fresh process that imports that checkout's package, and each run's JSON (or its failure) is kept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import argparse, json, pathlib, sys, time
import ldm_sdk
p = argparse.ArgumentParser()
p.add_argument("--out", type=pathlib.Path)
p.add_argument("--tag")
args = p.parse_args()
if args.tag == "fail":
    sys.exit(3)
log = pathlib.Path(ldm_sdk.__file__).parents[1] / "order.log"
with log.open("a") as f:
    f.write(f"{time.monotonic_ns()}\\n")
args.out.write_text(json.dumps({"package": ldm_sdk.__file__, "tag": args.tag}))
"""


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ab_checkouts", ROOT / "bench" / "ab_checkouts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkout(root: Path) -> Path:
    (root / "ldm_sdk").mkdir(parents=True)
    (root / "ldm_sdk" / "__init__.py").write_text("")
    (root / "bench").mkdir()
    (root / "bench" / "probe.py").write_text(SCRIPT)
    return root


def test_runs_alternate_and_import_their_own_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ab = _load()
    base, head = _checkout(tmp_path / "base"), _checkout(tmp_path / "head")
    monkeypatch.setattr(ab, "ROOT", head)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = tmp_path / "ab.json"
    res = ab.main(
        ["--base", str(base), "--rounds", "2", "--out", str(out), "--", "bench/probe.py", "--tag", "x"]
    )
    assert json.loads(out.read_text()) == res
    assert res["args"] == ["--tag", "x"] and res["checkouts"] == {"base": str(base), "head": str(head)}
    for name, root in (("base", base), ("head", head)):
        runs = res["runs"][name]
        assert len(runs) == 2
        assert all(
            Path(r["result"]["package"]).resolve() == (root / "ldm_sdk" / "__init__.py").resolve()
            for r in runs
        )
    # base first in every round: its i-th run precedes head's i-th run, which precedes base's next
    times = {
        name: [int(t) for t in (root / "order.log").read_text().split()]
        for name, root in (("base", base), ("head", head))
    }
    order = sorted([(t, name) for name, ts in times.items() for t in ts])
    assert [name for _, name in order] == ["base", "head", "base", "head"]


def test_several_named_checkouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ab = _load()
    one, two, head = _checkout(tmp_path / "one"), _checkout(tmp_path / "two"), _checkout(tmp_path / "head")
    monkeypatch.setattr(ab, "ROOT", head)
    res = ab.main(["--base", f"old={one}", "--base", str(two), "--rounds", "1", "--", "bench/probe.py"])
    assert list(res["runs"]) == ["old", "base2", "head"]
    assert Path(res["runs"]["base2"][0]["result"]["package"]).resolve().parent == (two / "ldm_sdk").resolve()


def test_a_failing_run_is_kept_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ab = _load()
    base, head = _checkout(tmp_path / "base"), _checkout(tmp_path / "head")
    monkeypatch.setattr(ab, "ROOT", head)
    res = ab.main(["--base", str(base), "--rounds", "1", "--", "bench/probe.py", "--tag", "fail"])
    assert res["runs"]["base"][0]["error"] == "exit 3" and "result" not in res["runs"]["head"][0]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    ab = _load()
    with pytest.raises(SystemExit):
        ab.main(["--base", str(tmp_path), "--", "bench/probe.py"])  # not a checkout: no ldm_sdk/
    base = _checkout(tmp_path / "base")
    with pytest.raises(SystemExit):
        ab.main(["--base", str(base), "--rounds", "0", "--", "bench/probe.py"])
    with pytest.raises(SystemExit):
        ab.main(["--base", f"x={base}", "--base", f"x={base}", "--", "bench/probe.py"])  # one name twice
    with pytest.raises(FileNotFoundError, match="not in the checkout"):
        ab.main(["--base", str(base), "--rounds", "1", "--", "bench/missing.py"])
