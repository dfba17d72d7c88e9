"""tools/gpu_acceptance.sh runs every step, keeps going after a failure and writes one JSON (no GPU needed:
ACCEPTANCE_DRY_RUN=1 stubs the steps; without CUDA the GPU steps are skipped, which is not an acceptance)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_acceptance.sh")
STEPS = ["install_wheels", "build_ext", "gpu_tests", "dp2_equivalence", "bench_mrope", "bench_train_step"]


def _run(tmp_path, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(out), **env})
    with open(out / "gpu_acceptance.json") as f:
        return proc, json.load(f)


def test_scripts_parse():
    for script in (SCRIPT, os.path.join(REPO, "tools", "acceptance", "fetch_wheels.sh")):
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script


def test_dry_run_writes_one_json_with_every_step_and_the_bench_results(tmp_path):
    proc, report = _run(tmp_path, ACCEPTANCE_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert [s["name"] for s in report["steps"]] == STEPS
    assert report["failed"] == [] and report["skipped"] == [] and report["accepted"] is False  # a dry run accepts nothing
    assert report["environment"]["dry_run"] is True
    for s in report["steps"]:
        assert s["status"] == "dry_run" and s["rc"] == 0 and isinstance(s["seconds"], float)
        assert os.path.exists(s["log"]) and s["log_tail"][0].startswith("DRY RUN: ")
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["bench_mrope"]["result"] == {"dry_run": True, "step": "bench_mrope"}
    assert by_name["bench_train_step"]["result"]["step"] == "bench_train_step"
    assert "--lengths 8K,32K" in by_name["bench_train_step"]["log_tail"][0]
    assert "MVLM_DIST_BACKEND=gloo" in by_name["dp2_equivalence"]["log_tail"][0]
    assert "DRY RUN" in proc.stdout and "bench_train_step" in proc.stdout  # the summary table


def test_a_failing_step_does_not_stop_the_others_and_fails_the_run(tmp_path):
    proc, report = _run(tmp_path, ACCEPTANCE_DRY_RUN="1", ACCEPTANCE_DRY_FAIL="build_ext")
    assert proc.returncode == 1
    assert report["failed"] == ["build_ext"]
    assert [s["status"] for s in report["steps"]] == ["dry_run", "failed"] + ["dry_run"] * 4
    assert report["steps"][1]["reason"] == "exit status 1"


def test_the_time_budget_skips_what_no_longer_fits(tmp_path):
    proc, report = _run(tmp_path, ACCEPTANCE_DRY_RUN="1", ACCEPTANCE_BUDGET_S="5")
    assert proc.returncode == 2
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in report["steps"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_gpu_steps_are_skipped_not_passed(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    proc, report = _run(tmp_path, WHEELS_DIR=str(empty))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    status = {s["name"]: (s["status"], s["reason"]) for s in report["steps"]}
    assert status["install_wheels"][0] == "skipped" and "no wheels" in status["install_wheels"][1]
    assert all(status[n] == ("skipped", "no CUDA GPU visible to torch") for n in STEPS[1:])
    assert report["accepted"] is False and report["environment"]["gpu"] is None
    assert "NOT ACCEPTED" in proc.stdout
