"""The sha256 of checkpoint files, remembered across processes.

The runtime names a loaded model by its file's sha256 (the model cache's key, the manifests' model record).
Hashing reads the whole file: 0.8 s for a 330 MB file on the 2-vCPU VM, seconds for a 2-4 GB SD checkpoint,
paid again by every new process (a host starting the server, a script) before its first image.
:class:`FileHashMemo` keeps each digest in memory and, given a folder, on disk, under the file's *stamp*:
its resolved path, size, modification time, status-change time and inode (:func:`file_stamp`). Rewriting a
file changes its status-change time even when a tool restores the modification time and the size, so a
stamp never names two contents; a changed file gets a new stamp and is hashed again.

One small JSON file per stamp in the folder (``<cache root>/file-hashes``, see
:func:`ldm_sdk.cache_dir.cache_root`), written to a temporary file and renamed into place, so processes
sharing the folder never see half an entry. A folder that cannot be written leaves the memo in memory only
(logged once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: (resolved path, size, mtime_ns, ctime_ns, inode)
Stamp = tuple[str, int, int, int, int]


def file_stamp(path: str | os.PathLike[str]) -> Stamp:
    """What identifies a file's content without reading it: resolved path, size, mtime, ctime, inode."""
    p = Path(path)
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class FileHashMemo(MutableMapping[Stamp, str]):
    """``stamp -> sha256`` (see the module doc); ``folder=None`` keeps it in memory only."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[Stamp, str] = {}
        self._write_failed = False

    def _entry(self, stamp: Stamp) -> Path:
        assert self.folder is not None
        name = hashlib.sha256(json.dumps(list(stamp)).encode()).hexdigest()[:32]
        return self.folder / f"{name}.json"

    def __getitem__(self, stamp: Stamp) -> str:
        if stamp in self._memory:
            return self._memory[stamp]
        if self.folder is not None:
            try:
                entry = json.loads(self._entry(stamp).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                entry = None
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            if isinstance(entry, dict) and entry.get("stamp") == list(stamp) and _is_digest(digest):
                self._memory[stamp] = str(digest)
                return str(digest)
        raise KeyError(stamp)

    def __setitem__(self, stamp: Stamp, digest: str) -> None:
        if not _is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        self._memory[stamp] = digest
        if self.folder is None or self._write_failed:
            return
        tmp: str | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hash-", suffix=".json", dir=self.folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"stamp": list(stamp), "sha256": digest}, fh)
            os.replace(tmp, self._entry(stamp))
            tmp = None
        except OSError as exc:
            self._write_failed = True
            logger.warning(
                "cannot keep file hashes in %s (%s); they stay in this process only", self.folder, exc
            )
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def __delitem__(self, stamp: Stamp) -> None:
        found = self._memory.pop(stamp, None) is not None
        if self.folder is not None:
            try:
                self._entry(stamp).unlink()
                found = True
            except FileNotFoundError:
                pass
        if not found:
            raise KeyError(stamp)

    def __iter__(self) -> Iterator[Stamp]:
        return iter(dict(self._memory))  # this process's entries (the folder is a lookup, not a listing)

    def __len__(self) -> int:
        return len(self._memory)


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


__all__ = ["FileHashMemo", "Stamp", "file_stamp"]
