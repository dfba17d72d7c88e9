"""One writer per output: an exclusive, non-blocking lock held for the whole run.

    from megatron_vlm.common.locks import output_lock

    with output_lock(lock_path_for(args.output), args.output):
        ...  # the run

The lock is ``fcntl.flock`` on a small file next to the output (``OUT.lock``; a sharded run locks
``OUT.shard-I-of-N.lock``, so the shards of one array still run side by side). The file holds the
PID of the run that has it, for the refusal message. The kernel drops the lock when the process
exits, however it exits (kill -9 included), so a stale file never blocks a rerun; the file itself
is left in place on purpose: removing it would let two later runs lock two different files.

A second run on the same output is refused at once with one line (:class:`OutputLocked`, a
:class:`megatron_vlm.cli.UserError`: ``error: ...``, exit 2) naming the lock file and the PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator, Optional

from megatron_vlm.cli import UserError


class OutputLocked(UserError):
    """Another run holds the lock of this output."""


def lock_path_for(output: str, shard: tuple[int, int] = (0, 1), suffix: str = ".jsonl") -> str:
    """``OUT.jsonl`` -> ``OUT.lock``; ``PREFIX`` -> ``PREFIX.lock``; shard I of N (N > 1) ->
    ``OUT.shard-I-of-N.lock``."""
    base = output[:-len(suffix)] if suffix and output.endswith(suffix) else output
    base = base.rstrip(os.sep) or base
    index, count = shard
    return f"{base}.lock" if count <= 1 else f"{base}.shard-{index}-of-{count}.lock"


def _holder(fd: int) -> Optional[str]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


@contextlib.contextmanager
def output_lock(lock_path: str, output: Optional[str] = None) -> Iterator[str]:
    """Hold the exclusive lock ``lock_path`` for the block; refuse at once if another run has it."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            who = f"PID {pid}" if pid else "another process"
            raise OutputLocked(f"{output or lock_path} is being written by another run ({who} holds the lock "
                               f"{lock_path}); wait for it to finish, or use another output") from None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield lock_path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


__all__ = ["OutputLocked", "lock_path_for", "output_lock"]
