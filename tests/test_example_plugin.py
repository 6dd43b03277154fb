"""The first-party example plugin, installed for real (pip, offline, into a temporary folder) and discovered
exactly as a third-party plugin is: entry point, listing, switches, the CLI, and the plugin's own tests.

(The plugin's own test suite runs from here, in a subprocess with the installed copy on ``PYTHONPATH``.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ldm_sdk.encoders.base import EncoderSpec
from ldm_sdk.runtime import Runtime

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "ldm-sdk-plugin-example"
MODULE = "ldm_sdk_plugin_example"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin pip-installed (no dependencies, no index, no build isolation) into a fresh folder."""
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "source"  # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "--target", str(target), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (target / MODULE / "plugin.py").is_file()
    return target


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The installed plugin importable in this process for one test (its modules forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("LDM_SDK_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("LDM_SDK_NO_ENTRYPOINTS", raising=False)
    yield site
    for name in [m for m in sys.modules if m == MODULE or m.startswith(MODULE + ".")]:
        del sys.modules[name]


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDM_SDK_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    return {**env, **extra}


def test_a_runtime_discovers_it_by_entry_point(installed: Path) -> None:
    with Runtime.create(device="cpu") as runtime:
        info = {p.name: p for p in runtime.plugins()}["example"]
        assert (info.version, info.distribution, info.source, info.enabled) == (
            "0.1.0",
            "ldm-sdk-plugin-example",
            "entrypoint",
            True,
        )
        assert info.registered == {"samplers": ("heun",), "condition_encoders": ("palette",)}
        heun = runtime.registries.samplers.get("heun")
        assert heun.__module__ == "ldm_sdk_plugin_example.heun"
        assert Path(sys.modules["ldm_sdk_plugin_example.heun"].__file__ or "").is_relative_to(installed)
        spec = runtime.registries.condition_encoders.get("palette")
        assert isinstance(spec, EncoderSpec) and (spec.modality, spec.kind) == ("color", "crossattn")
        encoder = spec.factory(context_dim=8, n_colors=2)
        assert encoder.contract().tokens == 2
        # the built-ins are still there, attributed to the built-in plugin
        assert runtime.registries.samplers.entry("ddim").plugin == "builtin"


def test_disabled_by_environment_it_is_never_imported(
    installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LDM_SDK_DISABLE_PLUGINS", "example")
    with Runtime.create(device="cpu") as runtime:
        info = {p.name: p for p in runtime.plugins()}["example"]
        assert not info.enabled and info.registered == {} and info.version == "0.1.0"
        assert "heun" not in runtime.registries.samplers
        assert "palette" not in runtime.registries.condition_encoders
    assert f"{MODULE}.plugin" not in sys.modules


def test_without_entry_points_it_is_not_loaded(installed: Path) -> None:
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        assert "example" not in {p.name for p in runtime.plugins()}


def test_the_cli_lists_it_next_to_the_built_ins(site: Path) -> None:
    script = Path(sys.executable).with_name("ldm-sdk")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ldm_sdk"]
    done = subprocess.run(
        [*command, "plugins", "--json"], capture_output=True, text=True, timeout=120, env=_env(site)
    )
    assert done.returncode == 0, done.stderr
    listing = {p["name"]: p for p in json.loads(done.stdout)}
    assert list(listing)[:2] == ["builtin", "example"]
    example, builtin = listing["example"], listing["builtin"]
    assert example["version"] == "0.1.0" and example["distribution"] == "ldm-sdk-plugin-example"
    assert example["registered"] == {"samplers": ["heun"], "condition_encoders": ["palette"]}
    assert builtin["registered"]["condition_encoders"] == [
        "class",
        "clip-text",
        "layout",
        "ldm-bert",
        "lowres",
        "mask",
        "minilm",
        "semantic",
    ]
    assert {"ddim", "plms", "euler_ancestral"} <= set(builtin["registered"]["samplers"])
    assert {"safetensors", "ckpt", "diffusers"} <= set(builtin["registered"]["checkpoint_formats"])

    disabled = subprocess.run(
        [*command, "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(site, LDM_SDK_DISABLE_PLUGINS="example"),
    )
    assert disabled.returncode == 0, disabled.stderr
    assert {p["name"]: p["enabled"] for p in json.loads(disabled.stdout)}["example"] is False


def test_the_plugins_own_test_suite_passes_against_the_installed_copy(site: Path) -> None:
    # run from the plugin's folder: its pyproject is the pytest config; the ldm_sdk pytest plugin
    # (fixtures ldm_runtime, tiny_sd_bundle ...) is loaded by its pytest11 entry point, not a conftest
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::pytest.PytestUnknownMarkWarning",
        ],
        cwd=PLUGIN,
        capture_output=True,
        text=True,
        timeout=400,
        env=_env(site),
    )
    assert done.returncode == 0, (
        f"the example plugin's tests failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    )
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary  # entry-point test ran too
