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
