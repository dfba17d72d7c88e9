"""examples/longpt_128k.sh: valid bash, a dry run prints the exact launch, missing paths fail early."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "examples", "longpt_128k.sh")


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_prints_the_launch_command():
    env = {**os.environ, "MODEL_DIR": "/ckpt/q7b", "DATA_PREFIX": "/data/mix", "DRY_RUN": "1",
           "SLURM_JOB_NUM_NODES": "8", "CP": "2"}
    out = subprocess.run(["bash", SCRIPT, "--set", "optim.lr=2e-5"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes 8 --nproc_per_node 8")
    for part in ("-m megatron_vlm.train --recipe qwen25vl_7b_longpt_128k", "model.load=/ckpt/q7b",
                 "data.prefix=/data/mix", "parallel.context_parallel=2", "optim.lr=2e-5"):
        assert part in line, part


def test_missing_model_dir_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "DATA_PREFIX")}
    out = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env={**env, "DRY_RUN": "1"})
    assert out.returncode != 0 and "MODEL_DIR" in out.stderr


def _dry(**extra):
    env = {**os.environ, "MODEL_DIR": "/ckpt/q7b", "DATA_PREFIX": "/data/mix", "DRY_RUN": "1", **extra}
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env)


def test_torchrun_forwards_usr1_and_waits_the_save_grace():
    """A preempted job saves: torchrun forwards SIGUSR1 and waits SAVE_GRACE_SECONDS before SIGKILL
    (tests/unit/test_launcher_preemption.py runs it for real)."""
    line = _dry().stdout
    assert "--signals-to-handle SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1" in line
    assert "--shutdown-timeout 600" in line  # default sized for a 7B checkpoint
    assert "--shutdown-timeout 900" in _dry(SAVE_GRACE_SECONDS="900").stdout
    assert line.index("--shutdown-timeout") < line.index("-m megatron_vlm.train")  # torchrun's, not the trainer's
    with open(SCRIPT) as f:
        assert "#SBATCH --signal=B:USR1@720\n" in f.read()


def test_local_launcher_and_bad_settings():
    out = _dry(LAUNCHER="local")
    assert out.returncode == 0 and out.stdout.startswith("setsid torchrun --nnodes 1 --nproc_per_node 8"), out
    for extra, needle in (({"SAVE_GRACE_SECONDS": "10m"}, "SAVE_GRACE_SECONDS"), ({"LAUNCHER": "mpirun"}, "LAUNCHER")):
        bad = _dry(**extra)
        assert bad.returncode != 0 and needle in bad.stderr, bad
