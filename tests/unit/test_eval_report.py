"""Report aggregation against hand-computed averages: per dataset, per length, macro over datasets,
overall over lengths, separate suites, differences to the baseline, Markdown and PNG."""

from __future__ import annotations

import pytest
from PIL import Image

from megatron_vlm.eval.report import render_markdown, write_report


def rec(model, dataset, length, score, task="docqa", **extra):
    return {"model": model, "dataset": dataset, "length": length, "score": score, "task": task,
            "num_tokens": length - 100, "scored_by": "rules", **extra}


RECORDS = [
    # A at 8K: d1 = mean(1, 0) = 50, d2 = 100 -> AVG 75; at 16K: d1 = 0, d2 = 50 -> AVG 25; overall 50
    rec("A", "d1", 8192, 1.0), rec("A", "d1", 8192, 0.0, error="HTTP 500"), rec("A", "d2", 8192, 1.0),
    rec("A", "d1", 16384, 0.0), rec("A", "d1", 16384, 0.0, scored_by="empty"), rec("A", "d2", 16384, 0.5),
    # B at 8K: d1 = 100, d2 = 0 -> AVG 50; at 16K: d1 = 50 and no d2 -> AVG 50 (incomplete); overall 50
    rec("B", "d1", 8192, 1.0), rec("B", "d1", 8192, 1.0), rec("B", "d2", 8192, 0.0),
    rec("B", "d1", 16384, 1.0), rec("B", "d1", 16384, 0.0, scored_by="rules (judge reply unusable)"),
    # a needle suite, averaged on its own: depth 0 found, depth 1 missed
    rec("A", "niah-text", 8192, 1.0, task="niah", depth=0.0), rec("A", "niah-text", 8192, 0.0, task="niah", depth=1.0),
]


def test_report(tmp_path):
    report = write_report(RECORDS, str(tmp_path), models=["A", "B"], dropped={"d1": {"missing_image": 2}})
    doc = report["suites"]["docqa"]["models"]
    assert doc["A"]["lengths"]["8K"]["AVG"] == pytest.approx(75) and doc["A"]["lengths"]["16K"]["AVG"] == pytest.approx(25)
    assert doc["A"]["overall"] == pytest.approx(50) and doc["B"]["overall"] == pytest.approx(50)
    assert doc["B"]["lengths"]["16K"]["complete"] is False and doc["A"]["lengths"]["16K"]["complete"] is True
    cell = doc["A"]["lengths"]["8K"]["datasets"]["d1"]
    assert cell == {"score": pytest.approx(50), "n": 2, "errors": 1, "empty": 0, "judge_fallbacks": 0,
                    "mean_tokens": pytest.approx(8092)}
    assert doc["A"]["lengths"]["16K"]["datasets"]["d1"]["empty"] == 1
    assert doc["B"]["lengths"]["16K"]["datasets"]["d1"]["judge_fallbacks"] == 1
    niah = report["suites"]["niah"]["models"]["A"]["lengths"]["8K"]
    assert niah["AVG"] == pytest.approx(50) and niah["datasets"]["niah-text"]["by_depth"] == {"0": 100, "1": 0}
    md = (tmp_path / "report.md").read_text()
    assert "| A | 75.00 | 25.00 | 50.00 |" in md and "| B | 50.00 | 50.00 | 50.00 |" in md
    assert "| Δ B − A | -25.00 | +25.00 | +0.00 |" in md
    assert "| B | 100.00 | 0.00 | 50.00 |" in md  # the 8K per-dataset table
    assert "| d1 | missing_image | 2 |" in md
    # the paper's overall AVG uses only some lengths
    only16 = write_report(RECORDS, str(tmp_path / "b"), overall_lengths=[16384], baseline="B", plot=False)
    assert only16["suites"]["docqa"]["models"]["A"]["overall"] == pytest.approx(25)
    assert "| Δ A − B |" in render_markdown(only16)
    image = Image.open(tmp_path / "eval_curve.png")
    assert image.format == "PNG" and image.size[0] >= 800
