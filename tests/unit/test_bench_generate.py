"""tools/bench/generate.py runs end to end on a tiny prompt: both paths, same ids, a speedup row."""

from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_bench_generate_reports_both_paths(tmp_path, megatron_world):
    spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(ROOT, "tools", "bench", "generate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    assert bench.main(["--tokens", "200", "--new-tokens", "3", "--page-size", "224", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["prompt_tokens"] >= 200 and row["new_tokens"] == 3 and row["same_ids"] is True
    assert row["speedup"] > 0 and row["cached_s"] > 0
