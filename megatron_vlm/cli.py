"""What every command-line tool shares: clean stops, one-line errors, quiet libraries.

    from megatron_vlm import cli

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        cli.on_stop(lambda: f"stopped: {done()} of {n} written to {args.output}; {cli.RESUME}")
        ...

    if __name__ == "__main__":
        cli.run_cli(main)

``run_cli`` turns Ctrl-C (SIGINT) and SIGTERM into a :class:`Stopped` (a ``KeyboardInterrupt``), so
``finally`` blocks and ``except BaseException`` clean-ups (progress files, reports, worker pools)
run as they would for Ctrl-C; then it prints ONE line (the tool's :func:`on_stop` note) and exits
130 (SIGINT) or 143 (SIGTERM), without a traceback. A second signal while stopping exits at once.
Threads still in flight (HTTP calls) are waited for at most ``THREAD_GRACE_S``.

A :class:`UserError` (bad input, missing file, refusal to overwrite) is printed as one line
``error: ...`` with exit status 2. ``MVLM_DEBUG=1`` (or ``--debug`` where a tool has it) shows
tracebacks instead.

Library noise (Transformer Engine / Apex "not installed" warnings from megatron-core, transformers'
"torch_dtype is deprecated") is filtered here, by message, for the tools only: library code and
tests keep every warning.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Callable, NoReturn, Optional

RESUME = "rerun the same command to resume"
THREAD_GRACE_S = 2.0
DEBUG_ENV = "MVLM_DEBUG"
SLOW_ENV = "MVLM_TEST_SLOW_STEP"  # tests: seconds to sleep per unit of work (see step())


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM while a tool runs."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class UserError(Exception):
    """The user's mistake, fixable by them: printed as ``error: <message>`` (say what to do)."""


_note: Optional[Callable[[], str]] = None
_stopping = False


def on_stop(note: Callable[[], str]) -> None:
    """Register the function that says what was kept when the tool is stopped (the latest wins).
    It runs after the clean-ups, so it can count what is on disk; it should not raise."""
    global _note
    _note = note


def step() -> None:
    """A unit of work is done. Only for tests: with ``MVLM_TEST_SLOW_STEP=S`` it sleeps S seconds,
    so a test can interrupt a tool on a small input while it is working."""
    delay = os.environ.get(SLOW_ENV)
    if delay:
        time.sleep(float(delay))


def count_lines(path: str) -> int:
    """Complete lines of a JSONL file (0 if missing); for stop notes."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n") and line.strip())
    except OSError:
        return 0


# ------------------------------------------------------------------------------ shared flags
WORKERS_HELP = "worker processes (0: in this process, without time or memory limits; for debugging)"
MAX_SEQ_LEN = 131072  # the trainer's data.max_seq_len of the LongPT recipes
MAX_SEQ_LEN_HELP = ("longest sample kept, in tokens (chat template applied, images expanded; K = 1024, "
                    "e.g. 128K); longer samples are dropped")
FORCE_HELP = "discard outputs written with other settings and start again (instead of refusing)"


def default_workers() -> int:
    """One default for every tool's ``--workers``: all cores but one."""
    return max(1, (os.cpu_count() or 2) - 1)


def token_count(text: str) -> int:
    """argparse type of token counts: 131072, 128K, 1M (binary prefixes, as the mixing stage)."""
    import argparse

    value = str(text).strip().upper().replace("_", "").replace(",", "")
    scale = {"K": 2**10, "M": 2**20, "B": 2**30}.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 131072 or 128K)") from None
    if number < 0 or number * scale != int(number * scale):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole, non-negative token count")
    return int(number * scale)


class DeprecatedAlias:
    """An old flag name kept working: hidden from --help, one-line note when used."""

    @staticmethod
    def add(parser, old: str, new: str, **kwargs) -> None:
        import argparse

        class _Action(argparse.Action):
            def __call__(self, p, namespace, values, option_string=None):
                _print(f"note: {old} is deprecated; use {new} (same meaning)")
                setattr(namespace, self.dest, values)

        parser.add_argument(old, action=_Action, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def settings_diff(existing: dict, wanted: dict) -> str:
    """``key: OLD (existing) -> NEW (this run)`` for every differing key, for refusal messages."""
    import json

    def short(value) -> str:
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 80 else text[:77] + "..."

    keys = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
    return "; ".join(f"{k}: {short(existing.get(k))} (existing) -> {short(wanted.get(k))} (this run)" for k in keys)


# ------------------------------------------------------------------------------ threads
def thread_map(fn: Callable, items, workers: int):
    """``ThreadPoolExecutor.map`` that lets go at once when the consumer stops (Ctrl-C, error):
    pending calls are cancelled and the calls in flight are not waited for (``run_cli`` waits at
    most ``THREAD_GRACE_S`` for them before exiting). Results come in input order."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, workers))
    futures = []
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------ noise
_WARNING_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
    r".*`torch_dtype` is deprecated",
)
_LOG_MESSAGES = ("`torch_dtype` is deprecated",)
_LOGGERS = ("transformers.configuration_utils", "transformers.modeling_utils")


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in _LOG_MESSAGES)


def quiet_library_noise() -> None:
    """Filter known, harmless library messages (by message text only)."""
    for message in _WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages())


# ------------------------------------------------------------------------------ signals
def _handler(signum, frame) -> None:
    global _stopping
    if _stopping:  # a second signal while cleaning up: go now
        _print(f"stopped ({signal.Signals(signum).name} again): exiting without waiting for clean-up")
        os._exit(128 + int(signum))
    _stopping = True
    raise Stopped(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def _print(line: str) -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _stop_line() -> str:
    note = None
    if _note is not None:
        try:
            note = _note()
        except Exception as exc:  # never let the note hide the stop
            note = f"stopped ({type(exc).__name__} while counting what was kept); {RESUME}"
    return note or f"stopped; {RESUME}"


def _exit_now(code: int) -> NoReturn:
    """Exit without joining threads still blocked in I/O beyond a short grace period."""
    deadline = time.monotonic() + THREAD_GRACE_S
    for t in threading.enumerate():
        if t is threading.current_thread() or t.daemon:
            continue
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.current_thread() for t in threading.enumerate()):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    sys.exit(code)


def run_cli(main: Callable[..., Optional[int]], argv: Optional[list] = None) -> NoReturn:
    """Run a tool's ``main(argv)`` with clean stops and one-line errors; exits with its status."""
    global _stopping
    quiet_library_noise()
    install_signal_handlers()
    try:
        code = main(argv)
    except KeyboardInterrupt as exc:  # Stopped, or a plain KeyboardInterrupt (e.g. from asyncio.run)
        _stopping = True
        signum = getattr(exc, "signum", signal.SIGINT)
        for sig in (signal.SIGINT, signal.SIGTERM):  # clean-up is over; a second signal just exits
            signal.signal(sig, _handler)
        if _debug():
            traceback.print_exc()
        _print(_stop_line())
        _exit_now(128 + int(signum))
    except UserError as exc:
        if _debug():
            traceback.print_exc()
        _print(f"error: {exc}")
        sys.exit(2)
    except BrokenPipeError:  # `tool ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(1)
    sys.exit(0 if code is None else int(code))


__all__ = ["DeprecatedAlias", "FORCE_HELP", "MAX_SEQ_LEN", "MAX_SEQ_LEN_HELP", "RESUME", "WORKERS_HELP",
           "default_workers", "settings_diff", "token_count", "Stopped", "UserError", "count_lines", "install_signal_handlers", "on_stop",
           "quiet_library_noise", "run_cli", "step", "thread_map"]
