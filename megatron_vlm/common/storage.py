"""Crash-safe files for the pool: atomic whole-file writes and append-only JSONL whose lines are
their own completion markers.

A killed run must never leave a half record that a rerun trusts. Whole files (page images, block
files, the merged manifest, reports) are written to a temporary name in the same folder and
renamed over the target, which POSIX makes atomic. Manifest lines are appended with one
``write`` each and fsynced; a line counts only if it ends with a newline and parses as a JSON
object, and :func:`read_jsonl` cuts a torn last line off before anything is appended after it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from typing import Any, Iterator, Optional, Sequence


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600 files; pool files are for every reader
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dumps(obj: Any, indent: Optional[int] = None) -> str:
    """The one JSON encoding the pool uses (UTF-8 text, key order as built, no NaN)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent,
                      separators=None if indent else (",", ":"))


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 2, fsync: bool = True) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=indent) + "\n").encode("utf-8"), fsync=fsync)


def atomic_write_json_gz(path: str, obj: Any) -> None:
    """Gzipped JSON (block files: mostly text, ~4-5x smaller); mtime 0 keeps bytes reproducible."""
    atomic_write_bytes(path, gzip.compress(dumps(obj).encode("utf-8"), compresslevel=6, mtime=0))


def read_json_gz(path: str) -> Any:
    with gzip.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def read_jsonl(path: str, repair: bool = False, keys: Optional[Sequence[str]] = None) -> list[dict]:
    """Complete records of an append-only JSONL file (only ``keys`` of each, if given: resuming a
    big shard needs two fields per record, not the records).

    Reading stops at the first line that lacks its newline or does not parse (a torn write from a
    killed run: only the last line can be one). With ``repair`` the file is truncated there, so
    the next append starts on a clean line.
    """
    if not os.path.exists(path):
        return []
    records: list[dict] = []
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except ValueError:
                break
            if not isinstance(obj, dict):
                break
            records.append(obj if keys is None else {k: obj.get(k) for k in keys})
            good_bytes += len(raw)
    if repair and good_bytes != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
            f.flush()
            os.fsync(f.fileno())
    return records


def iter_jsonl(path: str) -> Iterator[dict]:
    """Stream the complete records of a JSONL file (stops at a torn tail like :func:`read_jsonl`)."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            try:
                obj = json.loads(raw)
            except ValueError:
                return
            yield obj


class JsonlAppender:
    """Appends one JSON object per line; each line is one ``write`` followed by an fsync."""

    def __init__(self, path: str, fsync: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.fsync = fsync
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, obj: dict) -> None:
        data = (dumps(obj) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop for the pathological case
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "JsonlAppender",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_json_gz",
    "dumps",
    "iter_jsonl",
    "read_json_gz",
    "read_jsonl",
]
