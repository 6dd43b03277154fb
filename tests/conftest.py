"""Shared pytest setup: deterministic CPU defaults, the `gpu` mark, an empty Triton cache per test, the
SDK's cache folder per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ldm_sdk.cache_dir import CACHE_ENV


def pytest_configure(config: pytest.Config) -> None:
    # Tiny test networks run faster on one thread than on two busy cores (no thread hand-off per op).
    torch.set_num_threads(1)
    # The SDK's cache folder (tokenizer folder, asset index, checkpoint digests), one per test session:
    # tests neither read what a developer's runs left there nor fill it with digests of temporary files.
    if CACHE_ENV not in os.environ:
        folder = tempfile.mkdtemp(prefix="ldm-sdk-test-cache-")
        os.environ[CACHE_ENV] = folder

        def remove() -> None:
            os.environ.pop(CACHE_ENV, None)
            shutil.rmtree(folder, ignore_errors=True)

        config.add_cleanup(remove)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture
def triton_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Triton on-disk cache for this test (``TRITON_CACHE_DIR``; compile workers started afterwards
    inherit it)."""
    folder = tmp_path / "triton-cache"
    folder.mkdir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(folder))
    return folder
