"""Which PDFs a run (or one shard of it) processes, and their content hashes.

Inputs may be PDF files, folders (searched recursively for ``*.pdf``, any case), glob patterns, or
text files listing any of these one per line (``#`` comments; relative entries are resolved
against the list file's folder). The result is a sorted list of unique absolute paths, so every
shard of a Slurm array sees the same list and ``--shard I/N`` picks a deterministic subset: a path
belongs to shard ``int(sha256(path)) % N``, which spreads big folders evenly and does not change
when other files are added.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Iterable, Optional

_GLOB_CHARS = set("*?[")
_LIST_SUFFIXES = (".txt", ".lst", ".list", ".paths")


def _is_pdf_name(path: str) -> bool:
    return path.lower().endswith(".pdf")


def _looks_like_pdf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return b"%PDF-" in f.read(1024)
    except OSError:
        return False


def _expand(spec: str, base: str, out: set[str], seen_lists: set[str], missing: list[str]) -> None:
    spec = os.path.expanduser(spec.strip())
    if not spec:
        return
    path = spec if os.path.isabs(spec) else os.path.join(base, spec)
    if any(ch in _GLOB_CHARS for ch in spec):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            missing.append(spec)
        for match in matches:
            _expand(match, base, out, seen_lists, missing)
    elif os.path.isdir(path):
        for root, dirs, files in os.walk(path, followlinks=False):
            dirs.sort()
            out.update(os.path.abspath(os.path.join(root, name)) for name in files if _is_pdf_name(name))
    elif os.path.isfile(path):
        if _is_pdf_name(path) or (not path.lower().endswith(_LIST_SUFFIXES) and _looks_like_pdf(path)):
            out.add(os.path.abspath(path))
        else:
            real = os.path.realpath(path)
            if real in seen_lists:  # a list that includes itself
                return
            seen_lists.add(real)
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.lstrip().startswith("#"):  # whole-line comments only: paths may hold '#'
                        continue
                    _expand(line.rstrip("\n"), os.path.dirname(os.path.abspath(path)), out, seen_lists, missing)
    else:
        missing.append(spec)


def discover_inputs(specs: Iterable[str], missing: Optional[list[str]] = None) -> list[str]:
    """Sorted unique absolute PDF paths named by ``specs``; unmatched specs go to ``missing``."""
    out: set[str] = set()
    missing = missing if missing is not None else []
    for spec in specs:
        _expand(spec, os.getcwd(), out, set(), missing)
    return sorted(out)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> (I, N); ``"slurm"`` reads the Slurm array task id and count."""
    if text.strip().lower() == "slurm":
        try:
            index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        except KeyError as exc:
            raise ValueError(f"--shard slurm outside a Slurm array job ({exc.args[0]} is not set)") from exc
    else:
        try:
            left, right = text.split("/")
            index, count = int(left), int(right)
        except ValueError as exc:
            raise ValueError(f"--shard must look like I/N (0-based), got {text!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: need 0 <= I < N")
    return index, count


def shard_of(path: str, num_shards: int) -> int:
    """The shard a path belongs to (stable across runs and machines for the same path string)."""
    digest = hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def select_shard(paths: Iterable[str], index: int, count: int) -> list[str]:
    return [p for p in paths if shard_of(p, count) == index]


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the pool's document identity and decontamination key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def read_hash_list(path: str) -> set[str]:
    """SHA-256 hashes to exclude: one per line, first field (``sha256sum`` output works), ``#``
    comments allowed; anything that is not 64 hex digits is an error (a wrong file must not
    silently exclude nothing)."""
    hashes = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            value = line.split()[0].lower().lstrip("\\")
            if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
                raise ValueError(f"{path}:{number}: not a SHA-256 hex digest: {value[:80]!r}")
            hashes.add(value)
    return hashes


__all__ = ["discover_inputs", "parse_shard", "read_hash_list", "select_shard", "sha256_file", "shard_of"]
