"""Stopping `python -m megatron_vlm.train` as Ctrl-C and scancel do (a signal to the whole process
group, data-loader workers included): the step finishes, a checkpoint is saved, one line says how
to resume, no traceback; rerunning the same command resumes from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def _command(run_dir: str, steps: int, data: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_vlm.train", "--recipe", "tiny_cpu", *data,
            "--set", f"schedule.train_steps={steps}", "--set", "checkpoint.interval=0",
            "--set", f"log.run_dir={run_dir}", "--set", "log.tensorboard=false", "--set", "log.interval=1"]


SYNTHETIC = ["--set", "data.max_seq_len=256", "--set", "schedule.global_batch_tokens=512"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    """A preprocessed dataset read by one data-loader worker process (which gets the signal too)."""
    from tests.unit.data_helpers import build_small_dataset

    prefix = build_small_dataset(str(tmp_path_factory.mktemp("stopdata")))
    return ["--set", f"data.prefix={prefix}", "--set", "data.max_seq_len=512",
            "--set", "schedule.global_batch_tokens=1024", "--set", "data.num_workers=1"]


@pytest.mark.parametrize("signum,source", [(signal.SIGINT, "synthetic"), (signal.SIGTERM, "synthetic"),
                                           (signal.SIGTERM, "dataset")],
                         ids=["SIGINT", "SIGTERM", "SIGTERM-loader-worker"])
def test_a_signal_to_the_process_group_saves_once_and_the_rerun_resumes(tmp_path, signum, source, request):
    data = SYNTHETIC if source == "synthetic" else request.getfixturevalue("dataset")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_command(str(tmp_path / "run"), 1000, data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env, start_new_session=True)
    lines = []
    deadline = time.time() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            os.killpg(proc.pid, signum)  # the whole group, as the terminal and Slurm do
            break
        assert time.time() < deadline, "".join(lines)
    lines.extend(proc.stdout)
    assert proc.wait(timeout=60) == 0  # and no hang on the way out (the worker exits too)
    output = "".join(lines)
    assert "Traceback" not in output, output
    assert output.count("saved checkpoint") == 1, output
    assert "rerun the same command to resume" in output
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = (checkpoints / "latest").read_text().strip()
    stopped_at = int(saved.split("_")[1])
    assert stopped_at >= 2 and not any(p.name.endswith(".tmp") for p in checkpoints.iterdir())

    started = time.time()
    resumed = subprocess.run(_command(str(tmp_path / "run"), stopped_at + 1, data), capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=300)
    assert time.time() - started < 60  # a finished run exits: its loader workers are shut down
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout and f"step {stopped_at + 1}/{stopped_at + 1}" in resumed.stdout
