"""tools/bench/train_step.py: its defaults fit one 80 GB GPU by the memory planner, a tiny CPU run
writes JSON with both sides and their peak memory, and an out-of-memory side is recorded, not fatal."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GIB = 1024**3


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(ROOT, "tools", "bench",
                                                                                   "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_configuration_fits_80gb_by_the_memory_planner(bench):
    """7B geometry, default LM depth, default lengths: every row fits 80 GiB less the allocator
    slack, counting weights, gradients, AdamW states and (recomputed) activations of our side.
    Without recompute the same rows do not: the check has teeth."""
    args = bench.build_parser().parse_args([])
    assert args.preset == "7b" and args.recompute
    cfg = bench.model_config(args)
    assert cfg.vision.depth == 32 and cfg.language.hidden_size == 3584  # full width, full ViT
    lengths = [bench.parse_length(x) for x in args.lengths.split(",")]
    assert 8192 in lengths and 32768 in lengths
    for length in lengths:
        plan = bench.bench_plan(cfg, length, bench.page_grid(args), args.recompute)
        assert plan.total <= 80 * GIB * bench.ALLOCATOR_SLACK, (length, plan.total / GIB, plan.parts)
        assert plan.parts["LM activations"] > 0 and plan.parts["ViT activations"] > 0
    no_recompute = bench.bench_plan(cfg, 32768, bench.page_grid(args), recompute=False)
    assert no_recompute.total > 80 * GIB


TINY = ["--preset", "tiny", "--layers", "2", "--lengths", "1K", "--dtype", "fp32", "--repeats", "1",
        "--no-recompute"]


def test_cpu_smoke_run_writes_both_sides_as_json(bench, tmp_path):
    out = tmp_path / "bench" / "train_step.json"
    bench.main(TINY + ["--out", str(out)])
    report = json.loads(out.read_text())
    assert report["bench"] == "train_step" and report["plan"][0]["length"] == 1024
    assert report["plan"][0]["fits"] is True
    sides = {r["impl"]: r for r in report["results"]}
    assert set(sides) == {"ours", "hf"}
    for side in sides.values():
        assert side["status"] == "ok" and side["length"] == 1024 and side["tokens"] > 0
        assert side["step_s"] > 0 and side["tokens_per_s"] > 0
        assert "peak_memory_gib" in side and "mfu" in side
        if os.path.exists("/proc/self/status"):  # Linux: peak RSS of the process for this side
            assert side["peak_memory_gib"] > 0
    assert report["peak_memory_kind"] == "cpu_peak_rss"
    assert set(report["speedup_vs_hf"]) == {"1024"}


def test_out_of_memory_is_recorded_for_either_side_and_the_run_goes_on(bench, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise bench.OOM("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "step_hf", oom)
    report = bench.main(TINY + ["--lengths", "1K,2K", "--out", str(tmp_path / "hf_oom.json")])
    status = {(r["impl"], r["length"]): r["status"] for r in report["results"]}
    assert status == {("ours", 1024): "ok", ("ours", 2048): "ok", ("hf", 1024): "oom", ("hf", 2048): "oom"}
    assert report["speedup_vs_hf"] == {}

    monkeypatch.undo()
    calls = []

    def ours_oom_at_first_length(model, optimizer, row):
        calls.append(int(row.cu_seqlens[-1]))
        if len(calls) == 1:
            raise bench.OOM("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench, "step_ours", ours_oom_at_first_length)
    report = bench.main(TINY + ["--lengths", "1K,2K", "--skip-hf"])
    assert [(r["length"], r["status"]) for r in report["results"]] == [(1024, "oom"), (2048, "ok")]
