"""Fixtures of the task tests: a CPU runtime and the tiny model files of :mod:`tests.tasks.tiny_models`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ldm_sdk.runtime import Runtime
from tests.tasks.tiny_models import CONFIGS, save_tiny


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny-models")
    return {name: save_tiny(name, folder) for name in CONFIGS}


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as rt:
        yield rt


@pytest.fixture
def image32() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line as installed, without entry-point plugins (``LDM_SDK_NO_ENTRYPOINTS=1``)."""
    monkeypatch.setenv("LDM_SDK_NO_ENTRYPOINTS", "1")
