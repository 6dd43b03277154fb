"""Shared setup of the encoder tests: nothing reaches the Hugging Face Hub."""

from __future__ import annotations

import pytest

# the shared checks of the text-encoder tests report their failing values like a test module's asserts
pytest.register_assert_rewrite("tests.encoders.text_helpers")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
