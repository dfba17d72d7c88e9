"""tools/compare_runs.py: reports written by eval/report.py from hand-made scored records -> the
paper's layout with hand-computed averages, the paper's column names, the published row of a
matched run equal to the paper's printed numbers, a readable PNG, and clear errors."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os

import pytest
from PIL import Image

from megatron_vlm.eval.compare import CompareError, RunSpec, compare, render_csv, render_markdown, write_comparison
from megatron_vlm.eval.published import DATASETS, TABLE_ALIASES, TABLES, published_table
from megatron_vlm.eval.report import write_report

K = 1024
TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "compare_runs.py")


def _records(model, scores):
    """{(dataset, length): [record scores]} -> scored records as tools/evaluate.py writes them."""
    return [{"model": model, "dataset": ds, "length": n, "score": float(x), "task": "docqa", "num_tokens": n - 10,
             "scored_by": "mmlb-rules"} for (ds, n), xs in scores.items() for x in xs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    # a checkpoint called "ckpt" in its own report
    write_report(_records("ckpt", {
        ("mmlongdoc", 64 * K): [1, 0],          # 50
        ("longdocurl", 64 * K): [1, 1, 0, 0],   # 50
        ("slidevqa", 64 * K): [1],              # 100   -> 64K AVG. 200/3
        ("mmlongdoc", 128 * K): [0],            # 0
        ("longdocurl", 128 * K): [0.5],         # 50
        ("slidevqa", 128 * K): [1, 0],          # 50    -> 128K AVG. 100/3; AVG. 50
        ("mmlongdoc", 32 * K): [1],             # 32K: only MMLB-D -> 32K AVG. 100 (incomplete)
    }), str(root / "ocr"), plot=False)
    # only 64K: 100, 0, 50 -> 50
    write_report(_records("extract_multi", {("mmlongdoc", 64 * K): [1], ("longdocurl", 64 * K): [0],
                                            ("slidevqa", 64 * K): [0.5]}), str(root / "em"), plot=False)
    # two models in one report; "base" lacks 64K LD-URL
    write_report(_records("base", {("mmlongdoc", 64 * K): [0.25], ("slidevqa", 64 * K): [1],
                                   ("mmlongdoc", 128 * K): [0], ("longdocurl", 128 * K): [1],
                                   ("slidevqa", 128 * K): [0]})
                 + _records("other", {("mmlongdoc", 64 * K): [1]}), str(root / "two"), plot=False)
    return root


def _specs(root):
    return [RunSpec("ocr_full", str(root / "ocr")), RunSpec("extract_multi", str(root / "em" / "report.json")),
            RunSpec("base", str(root / "two"))]


def _row(comp, name, kind="run"):
    return next(r for r in comp.rows if r.name == name and r.kind == kind)


def test_table_values_and_averages(runs):
    comp = compare(_specs(runs))
    assert comp.lengths == [64 * K, 128 * K] and comp.extra_lengths == [32 * K]
    ocr = _row(comp, "ocr_full").values
    assert [ocr[c] for c in comp.main_columns] == pytest.approx([50, 50, 100, 200 / 3, 0, 50, 50, 100 / 3, 50])
    assert ocr["32K MMLB-D"] == pytest.approx(100) and ocr["32K LD-URL"] is None and ocr["32K AVG."] == 100
    assert "32K AVG." in _row(comp, "ocr_full").incomplete and "AVG." not in _row(comp, "ocr_full").incomplete
    em = _row(comp, "extract_multi")
    assert em.values["64K AVG."] == pytest.approx(50) and em.values["128K AVG."] is None
    assert em.values["AVG."] == pytest.approx(50) and "AVG." in em.incomplete
    base = _row(comp, "base")  # the report's model of the run's name
    assert base.values["64K LD-URL"] is None and base.values["64K AVG."] == pytest.approx(62.5)
    assert base.values["AVG."] == pytest.approx((62.5 + 100 / 3) / 2) and {"64K AVG.", "AVG."} <= base.incomplete
    assert [r.name for r in comp.rows] == ["ocr_full", "extract_multi", "base"]  # no paper table: runs only
    # the recomputed AVG. is the report's own where the datasets are the same
    with open(runs / "ocr" / "report.json") as f:
        own = json.load(f)["suites"]["docqa"]["models"]["ckpt"]
    assert [ocr["64K AVG."], ocr["128K AVG."], ocr["AVG."]] == pytest.approx(
        [own["lengths"]["64K"]["AVG"], own["lengths"]["128K"]["AVG"], own["overall"]])
    warned = " ".join(comp.warnings)
    assert "run extract_multi" in warned and "no 128K results" in warned and str(runs / "em") in warned
    assert "64K LD-URL" in warned
    md = render_markdown(comp)
    assert "| Run | 64K MMLB-D | 64K LD-URL | 64K SLIDE | 64K AVG. | 128K MMLB-D | 128K LD-URL | 128K SLIDE " \
           "| 128K AVG. | AVG. |" in md
    assert "| ocr_full | 50.00 | 50.00 | 100.00 | 66.67 | 0.00 | 50.00 | 50.00 | 33.33 | 50.00 |" in md
    assert "| extract_multi | 100.00 | 0.00 | 50.00 | 50.00 | – | – | – | – | 50.00* |" in md
    assert "| base | 25.00 | – | 100.00 | 62.50* |" in md
    assert "## Other lengths (32K)" in md and "| ocr_full | 100.00 | – | – | 100.00* |" in md


def test_paper_rows_matched_and_csv(runs):
    comp = compare(_specs(runs), "table1", {"extract_multi": "none"})
    assert {n: r.label for n, r in comp.matched.items()} == {"ocr_full": "OCR-full", "base": "Qwen2.5-VL-7B"}
    reader = list(csv.reader(io.StringIO(render_csv(comp))))
    header = reader[0]
    assert header == ["run", "kind", "paper row", "64K MMLB-D", "64K LD-URL", "64K SLIDE", "64K AVG.",
                      "128K MMLB-D", "128K LD-URL", "128K SLIDE", "128K AVG.", "AVG.",
                      "32K MMLB-D", "32K LD-URL", "32K SLIDE", "32K AVG.", "incomplete"]
    rows = {(r[0], r[1]): dict(zip(header, r)) for r in reader[1:]}
    paper = rows[("ocr_full", "paper")]
    assert paper["paper row"] == "OCR-full"
    # Table 1's OCR-full row as printed in the paper
    assert [float(paper[c]) for c in header[3:12]] == [23.67, 11.06, 59.00, 31.24, 23.97, 20.36, 61.00, 35.11, 33.17]
    assert paper["32K MMLB-D"] == ""  # the paper has no 32K: empty, not 0
    diff = rows[("ocr_full", "diff")]
    assert float(diff["AVG."]) == pytest.approx(50 - 33.17) and float(diff["64K LD-URL"]) == pytest.approx(50 - 11.06)
    assert rows[("extract_multi", "run")]["128K AVG."] == "" and ("extract_multi", "paper") not in rows
    # no difference against an AVG. over fewer datasets than the paper's
    assert rows[("base", "diff")]["64K AVG."] == "" and rows[("base", "diff")]["AVG."] == ""
    assert float(rows[("base", "diff")]["128K AVG."]) == pytest.approx(100 / 3 - 48.94, abs=1e-4)
    assert rows[("base", "run")]["incomplete"] == "64K AVG. AVG."
    base_paper = rows[("base", "paper")]
    assert float(base_paper["AVG."]) == 50.59 and float(base_paper["128K SLIDE"]) == 68.00
    # the table's other rows follow, unmatched
    assert ("", "paper") in rows and any(r[2] == "extract-multi" for r in reader if r[1] == "paper" and not r[0])
    md = render_markdown(comp)
    assert ("| ↳ paper: OCR-full (Table 1) | 23.67 | 11.06 | 59.00 | 31.24 | 23.97 | 20.36 | 61.00 | 35.11 "
            "| 33.17 |") in md
    assert "| ↳ Δ ocr_full − paper | +26.33 | +38.94 | +41.00 | +35.43 |" in md
    assert "## Other rows of Table 1 (paper)" in md
    # --match maps any name; table3 is the short-data ablation (Table 15) with Table 3 listed for reference
    short = compare([RunSpec("mine", str(runs / "ocr"))], "table3", {"mine": "20%"})
    assert short.matched["mine"].label == "20%" and short.matched["mine"].overall == 55.57
    assert "short-context benchmarks" in render_markdown(short)
    assert compare([RunSpec("ratio_8_2", str(runs / "ocr"))], "table2").matched["ratio_8_2"].label == "8:2"
    assert compare([RunSpec("extract_multi_long", str(runs / "ocr"))], "fig2").matched[
        "extract_multi_long"].scores[64 * K]["mmlongdoc"] == 36.29
    assert compare([RunSpec("reasoning_rope8e6", str(runs / "ocr"))], "table16").matched[
        "reasoning_rope8e6"].overall == 54.34


def test_outputs_written(runs, tmp_path):
    comp = compare(_specs(runs), "table1", title="Task ablation")
    paths = write_comparison(comp, str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == ["comparison.csv", "comparison.md", "comparison.png"]
    with Image.open(tmp_path / "out" / "comparison.png") as png:
        assert png.format == "PNG" and png.size[0] >= 1000 and png.size[1] >= 600
    assert (tmp_path / "out" / "comparison.md").read_text().startswith("# Task ablation")
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp")]


def test_errors(runs, tmp_path):
    with pytest.raises(CompareError, match="no runs"):
        compare([])
    with pytest.raises(CompareError, match=f"run gone: {tmp_path / 'nope'} does not exist"):
        compare([RunSpec("gone", str(tmp_path / "nope"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match=f"run e: no report.json in {tmp_path / 'empty'}"):
        compare([RunSpec("e", str(tmp_path / "empty"))])
    with pytest.raises(CompareError, match="holds models base, other: say which with --report-model x=MODEL"):
        compare([RunSpec("x", str(runs / "two"))])
    assert _row(compare([RunSpec("x", str(runs / "two"), model="other")]), "x").values["64K MMLB-D"] == 100
    with pytest.raises(CompareError, match="Table 1 has no such row"):
        compare([RunSpec("a", str(runs / "ocr"))], "table1", {"a": "nonsense"})
    with pytest.raises(CompareError, match="given twice"):
        compare([RunSpec("a", str(runs / "ocr")), RunSpec("a", str(runs / "em"))])


def test_cli(runs, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_runs_cli", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "cli"
    assert tool.main(["--run", f"ocr_full={runs / 'ocr'}", "--run", f"em={runs / 'em'}", "--output", str(out),
                      "--paper-table", "table1", "--match", "em=extract-multi", "--title", "T"]) == 0
    captured = capsys.readouterr()
    assert "warning: run em:" in captured.err and "ocr_full = OCR-full, em = extract-multi" in captured.out
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.md", "comparison.png"]
    from megatron_vlm.cli import UserError
    with pytest.raises(UserError, match="no runs"):
        tool.main(["--output", str(out)])
    with pytest.raises(UserError, match="expected NAME=EVAL_DIR"):
        tool.main(["--run", str(runs / "ocr"), "--output", str(out)])


def test_published_numbers_consistent():
    """Transcription check: each printed AVG. is the mean of its row's printed cells (to the paper's
    rounding), the overall AVG. the mean of the two lengths' (the closed models with an N/A cell: the
    mean of their five cells, as printed); no key names two rows of a table."""
    assert DATASETS == ("mmlongdoc", "longdocurl", "slidevqa")
    for table in TABLES.values():
        keys = {}
        for row in table.rows:
            for key in row.keys:
                assert keys.setdefault(key, row.label) == row.label, (table.key, key)
            cells = [row.scores[n][d] for n in table.lengths for d in DATASETS if row.scores[n][d] is not None]
            for n in table.lengths:
                present = [row.scores[n][d] for d in DATASETS if row.scores[n][d] is not None]
                assert sum(present) / len(present) == pytest.approx(row.scores[n]["AVG."], abs=0.01), (row.label, n)
            overall = (sum(cells) / len(cells) if len(cells) < 6 else
                       sum(row.scores[n]["AVG."] for n in table.lengths) / len(table.lengths))
            assert overall == pytest.approx(row.overall, abs=0.01), (table.key, row.label)
    assert published_table("table4").row("MMProLong").overall == 57.70
    assert all(published_table(a) is TABLES[k] for a, k in TABLE_ALIASES.items()) and published_table("none") is None


def test_other_datasets_and_lengths(runs, tmp_path):
    """Our own datasets are shown but not in the AVG. when MMLongBench's are there, averaged when alone;
    Table 5 moves the layout and the overall AVG. to 256K and 512K."""
    write_report(_records("m", {("mmlongdoc", 64 * K): [1], ("longdocurl", 64 * K): [0], ("slidevqa", 64 * K): [1],
                                ("heldout", 64 * K): [0]}), str(tmp_path / "mixed"), plot=False)
    write_report(_records("m", {("heldout", 64 * K): [1, 0], ("niah-like", 64 * K): [1]}), str(tmp_path / "ours"),
                 plot=False)
    mixed = compare([RunSpec("m", str(tmp_path / "mixed"))])
    assert mixed.datasets == ["mmlongdoc", "longdocurl", "slidevqa", "heldout"]
    assert mixed.rows[0].values["64K AVG."] == pytest.approx(200 / 3) and mixed.rows[0].values["64K heldout"] == 0
    assert "Not in the AVG.: heldout" in render_markdown(mixed)
    ours = compare([RunSpec("m", str(tmp_path / "ours"))])
    assert ours.avg_datasets == ["heldout", "niah-like"] and ours.rows[0].values["64K AVG."] == pytest.approx(75)
    t5 = compare([RunSpec("mmprolong", str(runs / "ocr"))], "table5")
    assert t5.lengths == [256 * K, 512 * K] and t5.extra_lengths == [32 * K, 64 * K, 128 * K]
    assert t5.main_columns[:4] == ["256K MMLB-D", "256K LD-URL", "256K SLIDE", "256K AVG."]
    assert t5.rows[0].values["AVG."] is None and t5.rows[1].values["AVG."] == 53.80
    assert "has no 256K, 512K results" in t5.warnings[0]
