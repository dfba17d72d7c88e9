"""Start a worker script under torchrun (gloo, one thread per process) and fail with its output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker: str, processes: int, args: list[str], out: str, timeout: int = 600) -> dict:
    """Run ``worker`` on ``processes`` ranks; return what rank 0 saved to ``out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_port", str(_free_port()), os.path.join(REPO, "tests", "multiproc", worker), *args,
           "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)
