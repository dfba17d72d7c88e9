"""A process pool where every task has a wall-clock limit, enforced by killing its worker.

``concurrent.futures`` and ``multiprocessing.Pool`` cannot stop one running task: a PDF that sends
MuPDF into a minutes-long loop (or a C call that never returns) would hold a worker, and in the
end the whole run, hostage. Here each worker is a process of its own with its own pipe; the parent
watches deadlines and exit sentinels, kills an overdue or dead worker, reports the task as
``timeout`` or ``crash`` and starts a fresh worker. Workers are started with ``spawn`` (no state
or threads inherited from the parent), die with the parent (PR_SET_PDEATHSIG on Linux, and EOF on
their pipe everywhere), and may cap their own address space so a hostile file fails with a memory
error inside the worker instead of exhausting the machine.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


@dataclass
class Outcome:
    """What became of one task: ``ok`` (``value`` set), ``error`` (the task raised), ``timeout``
    (killed at its deadline) or ``crash`` (the worker died: signal, memory, hard exit)."""

    status: str
    value: Any = None
    detail: str = ""
    seconds: float = 0.0


_READY = "ready"


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans after a kill -9)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _limit_memory(max_bytes: int) -> None:
    if max_bytes > 0:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
        except (ImportError, ValueError, OSError):
            pass


def _worker_main(conn, fn: Callable[[Any], Any], initializer: Optional[Callable[..., None]], initargs: tuple,
                 memory_bytes: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _limit_memory(memory_bytes)
    if initializer is not None:
        initializer(*initargs)
    try:
        conn.send(_READY)  # deadlines start with the first task, not with imports and warm-up
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        key, payload = message
        try:
            reply = (key, "ok", fn(payload), "")
        except MemoryError:
            reply = (key, "error", None, "MemoryError: over the worker memory limit")
        except Exception as exc:  # the task's failure, reported; the worker lives on
            frames = traceback.extract_tb(exc.__traceback__)
            where = ""
            if frames:
                where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})"
            reply = (key, "error", None, f"{type(exc).__name__}: {exc}{where}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _ignore_sigint():
    """Ignore SIGINT in this process (main thread only); returns the previous handler or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Worker:
    def __init__(self, ctx, fn, initializer, initargs, memory_bytes: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, initializer, initargs, memory_bytes),
                                daemon=True)
        # The child starts with SIGINT ignored (kept across exec), so a Ctrl-C that reaches the whole
        # process group while it imports cannot print a KeyboardInterrupt traceback from it.
        previous = _ignore_sigint()
        try:
            self.proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()
        self.key: Optional[int] = None
        self.started = 0.0
        self.ready = False

    def check_ready(self) -> None:
        """Take the worker's ready message; a worker that dies before it is a setup failure."""
        try:
            if self.conn.poll() and self.conn.recv() == _READY:
                self.ready = True
                return
        except (EOFError, OSError):
            pass
        if not self.proc.is_alive():
            raise RuntimeError(f"a worker process failed to start (exit code {self.proc.exitcode})")

    def assign(self, key: int, payload: Any) -> None:
        self.key = key
        self.started = time.monotonic()
        self.conn.send((key, payload))

    def stop(self, kill: bool = False) -> None:
        try:
            if kill:
                self.proc.kill()
            else:
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


def run_tasks(
    tasks: Iterable[T],
    fn: Callable[[Any], Any],
    workers: int,
    timeout: float,
    payload: Callable[[T], Any] = lambda task: task,
    initializer: Optional[Callable[..., None]] = None,
    initargs: tuple = (),
    memory_bytes: int = 0,
) -> Iterator[tuple[T, Outcome]]:
    """Run ``fn(payload(task))`` for every task in ``workers`` processes; yield (task, outcome) as
    tasks finish (completion order). ``timeout <= 0`` means no limit. ``workers == 0`` runs in
    this process, without limits (for debugging).

    ``fn``, ``initializer`` and payloads must be picklable (module-level functions, plain data).
    """
    if workers <= 0:
        if initializer is not None:
            initializer(*initargs)
        for task in tasks:
            start = time.monotonic()
            try:
                outcome = Outcome("ok", fn(payload(task)))
            except Exception as exc:
                outcome = Outcome("error", detail=f"{type(exc).__name__}: {exc}")
            outcome.seconds = time.monotonic() - start
            yield task, outcome
        return

    ctx = mp.get_context("spawn")
    todo = deque(enumerate(tasks))
    by_key: dict[int, T] = {}
    pool = [_Worker(ctx, fn, initializer, initargs, memory_bytes) for _ in range(min(workers, max(len(todo), 1)))]
    try:
        while todo or any(w.key is not None for w in pool):
            for w in pool:
                if w.ready and w.key is None and todo:
                    key, task = todo.popleft()
                    by_key[key] = task
                    w.assign(key, payload(task))
            busy = [w for w in pool if w.key is not None]
            starting = [w for w in pool if not w.ready]
            now = time.monotonic()
            wait_for = 1.0
            if timeout > 0:
                wait_for = max(0.0, min([wait_for] + [w.started + timeout - now for w in busy]))
            watched = busy + starting
            wait([w.conn for w in watched] + [w.proc.sentinel for w in watched], timeout=wait_for)
            for w in starting:
                w.check_ready()
            for i, w in enumerate(pool):
                if w.key is None:
                    continue
                outcome = _collect(w, timeout)
                if outcome is None:
                    continue
                task = by_key.pop(w.key)
                w.key = None
                if outcome.status in ("timeout", "crash"):
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, fn, initializer, initargs, memory_bytes)
                yield task, outcome
    finally:
        for w in pool:
            w.stop(kill=any(x.key is not None for x in pool))


def _collect(w: _Worker, timeout: float) -> Optional[Outcome]:
    """The worker's outcome if its task is over (reply, death or deadline), else None."""
    elapsed = time.monotonic() - w.started
    try:
        if w.conn.poll():
            key, status, value, detail = w.conn.recv()
            return Outcome(status, value, detail, elapsed)
    except (EOFError, OSError):
        pass  # the worker died mid-reply: a crash
    if not w.proc.is_alive():
        code = w.proc.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        return Outcome("crash", detail=f"worker died: {how}", seconds=elapsed)
    if timeout > 0 and elapsed > timeout:
        return Outcome("timeout", detail=f"over the {timeout:g} s limit per document", seconds=elapsed)
    return None


__all__ = ["Outcome", "run_tasks"]
