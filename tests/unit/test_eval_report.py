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
    assert cell == {"score": pytest.approx(50), "n": 2, "failed_excluded": 0, "errors": 1, "empty": 0, "judge_fallbacks": 0,
                    "judge_unparsed": 0, "mean_tokens": pytest.approx(8092)}
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


def _paper_records():
    """Two models, MMLongBench's three datasets at 8K, 64K, 128K and 256K (no 512K); each cell is
    the mean of its records' scores x100."""
    scores = {  # (model, dataset, length) -> record scores
        ("M", "mmlongdoc", 65536): [1, 0, 0, 1],   # 50
        ("M", "longdocurl", 65536): [1, 1, 0, 0.5],  # 62.5
        ("M", "slidevqa", 65536): [1, 1, 1, 0],    # 75      -> 64K AVG. (50 + 62.5 + 75) / 3 = 62.5
        ("M", "mmlongdoc", 131072): [0, 1],        # 50
        ("M", "longdocurl", 131072): [0.25, 0.25],  # 25
        ("M", "slidevqa", 131072): [1, 1],         # 100     -> 128K AVG. 175 / 3 = 58.333..
        ("M", "mmlongdoc", 262144): [0],           # 0
        ("M", "longdocurl", 262144): [1],          # 100
        ("M", "slidevqa", 262144): [0.5],          # 50      -> 256K AVG. 50; Table 5 AVG. = 50 (no 512K)
        ("M", "mmlongdoc", 8192): [1],             # 8K: not in the paper tables
        ("base", "mmlongdoc", 65536): [0, 0],      # 0
        ("base", "longdocurl", 65536): [1, 0],     # 50
        ("base", "slidevqa", 65536): [1],          # 100     -> 64K AVG. 50
        ("base", "mmlongdoc", 131072): [0.5],      # 50
        ("base", "longdocurl", 131072): [0],       # 0       -> no SLIDE at 128K: AVG. 25 over two (incomplete)
    }
    return [rec(m, ds, n, float(x)) for (m, ds, n), xs in scores.items() for x in xs]


def test_paper_tables(tmp_path):
    report = write_report(_paper_records(), str(tmp_path), models=["M", "base"], plot=False)
    suite = report["suites"]["docqa"]
    t4, t5 = suite["paper_tables"]
    assert t4["table"] == "Table 4" and t4["lengths"] == ["64K", "128K"]
    assert t4["columns"] == ["64K MMLB-D", "64K LD-URL", "64K SLIDE", "64K AVG.",
                             "128K MMLB-D", "128K LD-URL", "128K SLIDE", "128K AVG.", "AVG."]
    m = t4["rows"]["M"]
    assert [m[c] for c in t4["columns"]] == pytest.approx([50, 62.5, 75, 62.5, 50, 25, 100, 175 / 3,
                                                           (62.5 + 175 / 3) / 2])
    b = t4["rows"]["base"]
    assert b["128K SLIDE"] is None and b["128K AVG."] == pytest.approx(25) and b["AVG."] == pytest.approx(37.5)
    assert t4["incomplete"] == {"base": ["128K AVG.", "AVG."]}
    # Table 5: only 256K was run; its AVG. is over what is there
    assert t5["lengths"] == ["256K"]
    assert t5["columns"] == ["256K MMLB-D", "256K LD-URL", "256K SLIDE", "256K AVG.", "AVG."]
    assert [t5["rows"]["M"][c] for c in t5["columns"]] == pytest.approx([0, 100, 50, 50, 50])
    assert t5["rows"]["base"]["AVG."] is None
    # the overall AVG defaults to the paper's 64K and 128K, not every length run
    assert report["overall_lengths"] == [65536, 131072]
    assert suite["models"]["M"]["overall"] == pytest.approx((62.5 + 175 / 3) / 2)
    md = (tmp_path / "report.md").read_text()
    assert "| Model | 64K MMLB-D | 64K LD-URL | 64K SLIDE | 64K AVG. | 128K MMLB-D | 128K LD-URL | 128K SLIDE " \
           "| 128K AVG. | AVG. |" in md
    assert "| M | 50.00 | 62.50 | 75.00 | 62.50 | 50.00 | 25.00 | 100.00 | 58.33 | 60.42 |" in md
    assert "| base | 0.00 | 50.00 | 100.00 | 50.00 | 50.00 | 0.00 | – | 25.00* | 37.50* |" in md
    assert "| M | 0.00 | 100.00 | 50.00 | 50.00 | 50.00 |" in md  # Table 5 layout
    assert md.index("Table 4 layout") < md.index("Table 5 layout") < md.index("Average by length")
    # no 64K-512K run: no paper table; the overall AVG is over every length
    short = write_report([rec("M", "mmlongdoc", 8192, 1.0), rec("M", "mmlongdoc", 16384, 0.0)],
                         str(tmp_path / "s"), plot=False)
    assert short["suites"]["docqa"]["paper_tables"] == [] and short["overall_lengths"] == [8192, 16384]


def test_mmlb_failed_generations_excluded(tmp_path):
    """MMLongBench data: a failed generation leaves the average (official eval.py skips a None output)
    and is counted apart; our own data keeps scoring it 0; a cell with only failures has no score."""
    records = [rec("A", "mmlongdoc", 8192, 1.0), rec("A", "mmlongdoc", 8192, 0.0, error="HTTP 500"),
               rec("A", "mmlongdoc", 8192, 0.0, error="timeout"), rec("A", "mmlongdoc", 8192, 0.5),
               rec("A", "mine", 8192, 1.0), rec("A", "mine", 8192, 0.0, error="HTTP 500"),
               rec("A", "custom", 8192, 0.0, error="HTTP 500")]
    report = write_report(records, str(tmp_path), models=["A"], mmlb_datasets=["custom"], plot=False)
    row = report["suites"]["docqa"]["models"]["A"]["lengths"]["8K"]
    mm, mine, custom = row["datasets"]["mmlongdoc"], row["datasets"]["mine"], row["datasets"]["custom"]
    assert mm["score"] == pytest.approx(75) and mm["n"] == 2 and mm["failed_excluded"] == 2 and mm["errors"] == 2
    assert mine["score"] == pytest.approx(50) and mine["n"] == 2 and mine["failed_excluded"] == 0
    assert custom["score"] is None and custom["failed_excluded"] == 1
    assert row["AVG"] == pytest.approx(62.5) and row["complete"] is False
    md = (tmp_path / "report.md").read_text()
    assert "A / mmlongdoc / 8K: 2 failed generations excluded" in md
    assert "A / custom / 8K: 1 failed generations excluded" in md and "mine / 8K:" not in md
