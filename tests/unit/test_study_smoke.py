"""One ablation's --smoke end to end on the CPU (table16_rope, two variants sharing one data build):
generated inputs -> mix + preprocess -> the data check -> two tiny training runs with their mRoPE bases
-> evaluation at 1K/2K -> tools/compare_runs.py; then a rerun skips every done step."""

from __future__ import annotations

import csv
import json
import os

VARIANTS = ["extract-single_rope1e6", "extract-single_rope8e6"]


def test_table16_rope_smoke_end_to_end(tmp_path, capsys, monkeypatch):
    from megatron_vlm.study.__main__ import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["table16_rope", "--smoke", "--work", str(tmp_path), "--variants", ",".join(VARIANTS)]
    assert main(argv) == 0
    study = tmp_path / "table16_rope"
    with open(study / "comparison" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "kind", "paper row", "1K heldout", "1K AVG.", "2K heldout", "2K AVG.", "AVG.",
                             "incomplete"]
    runs = [r for r in rows if r["kind"] == "run"]
    assert [r["run"] for r in runs] == VARIANTS
    assert runs[1]["paper row"] == "extract-single base 8e6" and runs[0]["paper row"] == ""
    for r in runs:
        assert 0 <= float(r["AVG."]) <= 100

    summary = json.loads((study / "summary.json").read_text())
    (data,) = summary["data"].values()  # both variants share one data build
    stats = data["summary"]
    assert stats["distribution"] == "pool-native" and stats["short_ratio"] == 0
    assert list(stats["per_task"]) == ["extract-single"]
    assert stats["per_task"]["extract-single"]["token_share"] == 1.0
    assert stats["tokens"] >= 12 * 1024  # the smoke's budget, overshooting by less than a sample
    assert stats["tokens"] < 12 * 1024 + stats["per_task"]["extract-single"]["max_tokens"]
    pool_long = stats["per_task"]["extract-single"]["pool_long_share"]
    assert 0.236 <= pool_long <= 0.4  # the smoke's threshold puts 23.6% of the pool (+ ties) above it (Table 11)
    for name, base in zip(VARIANTS, (1e6, 8e6)):
        v = summary["variants"][name]
        assert v["status"] == "evaluated" and v["claims"]["rope_theta"] == base
        assert set(v["rope"]["found"].values()) == {base} and len(v["rope"]["found"]) == 2
        with open(os.path.join(v["run_dir"], "config.json")) as f:
            assert json.load(f)["model"]["rope_theta"] == base
        assert os.path.isfile(os.path.join(v["eval_dir"], "report.json"))
    assert "| extract-single_rope8e6 |" in (study / "summary.md").read_text()
    capsys.readouterr()

    # resumable: the rerun skips data, training and evaluation (only the comparison is redone)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("(skipped)") == 1 + 2 + 2
    assert ": running" in out and out.count(": running") == 1  # compare only
