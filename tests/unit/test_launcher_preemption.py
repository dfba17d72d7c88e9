"""examples/longpt_128k.sh stops a run the way Slurm does and every worker gets to finish its save.

The real launch path runs: the batch script, `srun` (a stand-in that execs its command, as srun's task
is torchrun), torchrun with 2 local workers. The workers are a fake ``megatron_vlm.train`` (found
first on sys.path because torchrun runs ``python -m`` in the job's working directory) that, on
SIGUSR1/SIGTERM/SIGINT, "saves" for FAKE_SAVE_SECONDS and then writes a marker, like the trainer.

Time is scaled down: the 3 s save stands for a multi-minute 7B save, and TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1
in the caller's environment stands for torchrun's 30 s default -- a launcher that leaves torchrun's
grace alone gets its workers SIGKILLed mid-save. LONGPT_SCRIPT=<path> runs these tests on another
version of the script (e.g. the one before the fix, which fails them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

SCRIPT = os.environ.get("LONGPT_SCRIPT") or os.path.join(REPO, "examples", "longpt_128k.sh")
SAVE_SECONDS = 3

FAKE_TRAINER = textwrap.dedent("""
    import os, signal, sys, time
    rank, out = os.environ["RANK"], os.environ["FAKE_OUT"]
    got = []
    def handler(signum, frame):
        got.append(signum)
        with open(os.path.join(out, f"signals.{rank}"), "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
    for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)
    with open(os.path.join(out, f"ready.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not got:                       # "training"
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.05)
    time.sleep(float(os.environ["FAKE_SAVE_SECONDS"]))   # "finish the step and save the checkpoint"
    with open(os.path.join(out, f"saved.{rank}"), "w") as f:
        f.write("ok")
    sys.exit(0)
""")

FAKE_SRUN = "#!/usr/bin/env bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec \"$@\"\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, launcher: str):
    job = tmp_path / "job"  # the job's working directory; holds the fake trainer package
    (job / "megatron_vlm").mkdir(parents=True)
    (job / "megatron_vlm" / "__init__.py").write_text("")
    (job / "megatron_vlm" / "train.py").write_text(FAKE_TRAINER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))}
    env.update({
        "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{env.get('PATH', '')}",
        "PYTHONPATH": "",  # the job directory (torchrun's `python -m` puts it first) supplies the trainer
        "MODEL_DIR": str(tmp_path / "model"), "DATA_PREFIX": str(tmp_path / "data"),
        "RUN_DIR": str(tmp_path / "run"), "GPUS_PER_NODE": "2", "CP": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "LAUNCHER": launcher,
        "SAVE_GRACE_SECONDS": "20", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1", "OMP_NUM_THREADS": "1",
        "FAKE_OUT": str(out), "FAKE_SAVE_SECONDS": str(SAVE_SECONDS),
    })
    log = open(tmp_path / "launcher.log", "w")
    # its own session, as a batch script is: the process group below is the job's, not pytest's
    proc = subprocess.Popen(["bash", SCRIPT], cwd=job, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, out, tmp_path / "launcher.log"


def _wait_ready(proc, out, log, n=2, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((out / f"ready.{r}").exists() for r in range(n)):
            time.sleep(0.2)
            return [int((out / f"ready.{r}").read_text() or 0) for r in range(n)]
        assert proc.poll() is None, f"launcher exited early ({proc.returncode}):\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"workers never started:\n{log.read_text()}")


def _cleanup(proc, pids):
    for pid in [proc.pid, *pids]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=10)


@pytest.mark.parametrize("launcher,how,sig", [
    ("srun", "batch", signal.SIGUSR1),   # #SBATCH --signal=B:USR1@...: Slurm signals the batch shell only
    ("srun", "group", signal.SIGTERM),   # scancel/preemption: the step (torchrun) and the shell get SIGTERM
    ("local", "group", signal.SIGINT),   # LAUNCHER=local, Ctrl-C / kill of the whole job's process group
])
def test_a_stopped_job_lets_every_worker_finish_its_save(tmp_path, launcher, how, sig):
    proc, out, log = _launch(tmp_path, launcher)
    pids = []
    try:
        pids = _wait_ready(proc, out, log)
        sent = time.monotonic()
        (os.kill if how == "batch" else os.killpg)(proc.pid, sig)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher still running 40 s after {sig.name}:\n{log.read_text()}")
        elapsed = time.monotonic() - sent
        # looked at the moment the launcher returned: a launcher that does not wait fails here too
        saved = {r: (out / f"saved.{r}").exists() for r in range(2)}
        signals = {r: ((out / f"signals.{r}").read_text().split() if (out / f"signals.{r}").exists() else [])
                   for r in range(2)}
        text = log.read_text()
        assert all(saved.values()), f"saves not finished when the launcher exited {saved}:\n{text}"
        assert signals == {0: [sig.name], 1: [sig.name]}, f"each worker must get the signal once: {signals}\n{text}"
        assert "forcefully exiting" not in text and "SIGKILL" not in text, text
        assert SAVE_SECONDS <= elapsed < 20, elapsed
    finally:
        _cleanup(proc, pids)


def test_grace_reaches_torchrun_and_the_slurm_warning_leaves_room_for_it():
    text = open(SCRIPT).read()
    env = {**os.environ, "MODEL_DIR": "/m", "DATA_PREFIX": "/d", "DRY_RUN": "1", "SAVE_GRACE_SECONDS": "777"}
    line = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    assert "--shutdown-timeout 777" in line
    assert "SIGUSR1" in line.split("--signals-to-handle", 1)[1].split()[0]
    lead = [ln for ln in text.splitlines() if ln.startswith("#SBATCH --signal=")]
    assert len(lead) == 1 and lead[0].startswith("#SBATCH --signal=B:USR1@"), lead
    default = int(text.split("SAVE_GRACE_SECONDS=${SAVE_GRACE_SECONDS:-", 1)[1].split("}", 1)[0])
    assert int(lead[0].rsplit("@", 1)[1]) >= default + 60
