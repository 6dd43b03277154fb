"""Checkpoint digests remembered across processes (``ldm_sdk.file_hashes``): a new memo on the same folder
answers without reading the file, a rewritten file is hashed again, and a broken or unwritable folder
never gives a wrong digest."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from ldm_sdk.checkpoints import safe_load
from ldm_sdk.file_hashes import FileHashMemo, file_stamp
from ldm_sdk.runtime import Runtime
from ldm_sdk.runtime_cache import content_hash


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object, **_: object) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(safe_load, "file_sha256", refuse)


def test_a_new_memo_finds_the_digest_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(4096))
    folder = tmp_path / "hashes"
    assert content_hash(model, FileHashMemo(folder)) == sha(model)
    assert len(list(folder.glob("*.json"))) == 1 and not list(folder.glob(".hash-*"))
    no_reading(monkeypatch)
    again = FileHashMemo(folder)  # as a new process has it
    assert content_hash(model, again) == sha(model) and len(again) == 1


def test_a_rewritten_file_is_hashed_again(tmp_path: Path) -> None:
    model = tmp_path / "model.ckpt"
    model.write_bytes(b"a" * 1000)
    memo = FileHashMemo(tmp_path / "hashes")
    first = content_hash(model, memo)
    before = model.stat()
    time.sleep(0.05)  # past coarse file-system clocks
    model.write_bytes(b"b" * 1000)  # same size
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old modification time
    assert content_hash(model, FileHashMemo(tmp_path / "hashes")) == sha(model) != first


def test_broken_entries_and_unwritable_folders_give_no_wrong_digest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    folder = tmp_path / "hashes"
    content_hash(model, FileHashMemo(folder))
    (entry,) = folder.glob("*.json")
    for broken in ("{not json", '{"stamp": [], "sha256": "' + "0" * 64 + '"}', '{"sha256": 5}'):
        entry.write_text(broken)
        assert content_hash(model, FileHashMemo(folder)) == sha(model)  # recomputed (and rewritten)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder would be")
    memo = FileHashMemo(blocked / "hashes")
    with caplog.at_level(logging.WARNING, logger="ldm_sdk.file_hashes"):
        assert content_hash(model, memo) == sha(model)
    assert "stay in this process only" in caplog.text and len(memo) == 1
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        memo[file_stamp(model)] = "abc"


def test_runtime_keeps_digests_in_its_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(os.urandom(2048))
    monkeypatch.setenv("LDM_SDK_CACHE", str(tmp_path / "cache"))
    with Runtime.create(load_entrypoints=False, device="cpu") as rt:
        key = rt.model_key(model)
    assert key.content == sha(model) and len(list((tmp_path / "cache" / "file-hashes").glob("*.json"))) == 1
    no_reading(monkeypatch)
    with Runtime.create(load_entrypoints=False, device="cpu") as rt:
        assert rt.model_key(model) == key
