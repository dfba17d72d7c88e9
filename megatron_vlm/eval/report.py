"""The evaluation report: per dataset, per length, macro averages (paper Tables 4-5), for several
models side by side, as JSON, Markdown and a PNG of score vs length.

Averages: the score of a dataset at a length is the mean of its examples' scores (x100); a
length's AVG is the macro average over the suite's datasets; the overall AVG is the macro
average over lengths (``overall_lengths``; by default 64K and 128K as the paper, or those of the
two that were run, else every length). Document QA and needle-in-a-haystack are separate suites
with separate averages. The first model (or ``baseline``) is the reference that every other
model's difference is shown against.

The document-QA suite also gets the paper's own layout (``paper_tables``): Table 4 (64K and 128K:
MMLB-D, LD-URL, SLIDE and AVG. at each length, then AVG. over the two lengths) and Table 5 (the
same at 256K and 512K), each only where one of its lengths was run. Columns are named as the
paper's, flattened to one header row ("64K MMLB-D", ..., "128K AVG.", "AVG."); datasets other than
MMLongBench's three keep their names and follow them.

MMLongBench's MM-NIAH (task ``mmniah``) is its own suite, averaged as the paper does (Appendix
B.4): a length's AVG is the macro average over the three families (retrieval, counting, reasoning),
each the mean of its text and image variants; its paper table (Table 17 / Figure 4 layout,
``mmniah_metrics.paper_table``) has Ret., Count, Reas., AVG. per length and over the overall
lengths. As in the official run, failed generations are left out of the means.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json
from megatron_vlm.eval.build import format_length, parse_length

SUITE_TITLES = {"docqa": "Long-document VQA (MMLongBench-style)", "niah": "Needle in a haystack",
                "mmniah": "MM-NIAH (MMLongBench standardised)"}
# the paper's column names of MMLongBench's document-QA datasets, in the paper's order
PAPER_DATASET_NAMES = {"mmlongdoc": "MMLB-D", "longdocurl": "LD-URL", "slidevqa": "SLIDE"}
# (table, its lengths): Table 4 reports 64K and 128K, Table 5 256K and 512K; AVG. is over those two
PAPER_TABLES = (("Table 4", (64 * 1024, 128 * 1024)), ("Table 5", (256 * 1024, 512 * 1024)))
PAPER_OVERALL_LENGTHS = PAPER_TABLES[0][1]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(records: Iterable[dict], models: Optional[Sequence[str]] = None,
              overall_lengths: Optional[Sequence[int]] = None, baseline: Optional[str] = None,
              dropped: Optional[dict] = None, mmlb_datasets: Iterable[str] = ()) -> dict:
    """Scored prediction records (model, dataset, length, task, score, ...) -> the report dict.

    Failed generations (records with an ``error``) of MMLongBench document-QA datasets are left out
    of the mean, as the official run does (MMLongBench eval.py ``run_test``: a ``None`` output is
    skipped before its metrics are appended, so ``np.mean`` never sees it); they are counted in the
    cell's ``failed_excluded``. For our own datasets a failed generation scores 0 (``errors``)."""
    from megatron_vlm.eval.judge import is_mmlb_dataset
    records = [dict(r, length=r["length"] if isinstance(r["length"], int) else parse_length(str(r["length"])))
               for r in records]
    model_order = list(models or [])
    for r in records:
        if r["model"] not in model_order:
            model_order.append(r["model"])
    cells: dict[tuple, list[dict]] = defaultdict(list)
    suites: dict[str, list[str]] = {}
    lengths = sorted({int(r["length"]) for r in records})
    for r in records:
        suite = r.get("task") if r.get("task") in ("niah", "mmniah") else "docqa"
        suites.setdefault(suite, [])
        if r["dataset"] not in suites[suite]:
            suites[suite].append(r["dataset"])
        cells[(r["model"], r["dataset"], int(r["length"]))].append(r)
    over = [n for n in (overall_lengths or PAPER_OVERALL_LENGTHS) if n in lengths] or lengths
    base = baseline if baseline in model_order else (model_order[0] if model_order else None)
    report: dict = {"models": model_order, "baseline": base, "lengths": lengths,
                    "length_labels": [format_length(n) for n in lengths], "overall_lengths": over, "suites": {}}
    for suite, datasets in sorted(suites.items()):
        datasets = sorted(datasets)
        table: dict = {}
        for model in model_order:
            per_length: dict = {}
            for n in lengths:
                row: dict = {}
                for ds in datasets:
                    rs = cells.get((model, ds, n), [])
                    if not rs:
                        continue
                    exclude = suite == "mmniah" or (suite == "docqa" and is_mmlb_dataset(ds, mmlb_datasets))
                    kept = [r for r in rs if not (exclude and r.get("error"))]
                    mean = _mean([float(r["score"]) for r in kept])
                    row[ds] = {
                        "score": 100 * mean if mean is not None else None,
                        "n": len(kept),
                        "failed_excluded": len(rs) - len(kept),
                        "errors": sum(1 for r in rs if r.get("error")),
                        "empty": sum(1 for r in rs if r.get("scored_by") == "empty"),
                        "judge_fallbacks": sum(1 for r in rs if str(r.get("scored_by", "")).startswith("rules (")),
                        "judge_unparsed": sum(1 for r in rs if "(reply unparsed" in str(r.get("scored_by", ""))),
                        "mean_tokens": _mean([float(r.get("num_tokens") or 0) for r in rs]),
                    }
                    depths = defaultdict(list)
                    for r in rs:
                        if r.get("depth") is not None:
                            depths[float(r["depth"])].append(float(r["score"]))
                    if depths:
                        row[ds]["by_depth"] = {f"{d:g}": 100 * _mean(v) for d, v in sorted(depths.items())}
                avg = _mean([row[ds]["score"] for ds in datasets if row.get(ds, {}).get("score") is not None])
                complete = all(row.get(ds, {}).get("score") is not None for ds in datasets)
                if suite == "mmniah":  # the paper's: families (text and image averaged), then their mean
                    from megatron_vlm.eval.mmniah_metrics import length_average
                    avg, complete = length_average(row)
                per_length[format_length(n)] = {"datasets": row, "AVG": avg, "complete": complete}
            overall = _mean([per_length[format_length(n)]["AVG"] for n in over
                             if per_length.get(format_length(n), {}).get("AVG") is not None])
            table[model] = {"lengths": per_length, "overall": overall}
        report["suites"][suite] = {"title": SUITE_TITLES[suite], "datasets": datasets, "models": table}
        if suite == "docqa":
            report["suites"][suite]["paper_tables"] = paper_tables(table, datasets, lengths)
        if suite == "mmniah":
            from megatron_vlm.eval.mmniah_metrics import paper_table
            report["suites"][suite]["paper_tables"] = [paper_table(table, lengths, over)]
            report["suites"][suite]["note"] = (
                "AVG is the paper's (Appendix B.4): the mean of Ret., Count and Reas., each the mean of its text "
                "and image variants; metrics are MMLongBench's (sub_em, soft_acc, mc_acc); failed generations "
                "are left out, as the official run does.")
    if dropped:
        report["dropped"] = dropped
    return report


def paper_dataset_order(datasets: Sequence[str]) -> list[str]:
    """MMLongBench's three in the paper's order (MMLB-D, LD-URL, SLIDE), then the others by name."""
    known = [d for name in PAPER_DATASET_NAMES for d in datasets if d == name]
    return known + sorted(d for d in datasets if d not in known)


def paper_tables(table: dict, datasets: Sequence[str], lengths: Sequence[int]) -> list[dict]:
    """The paper's Tables 4-5 from one suite's per-model results: per table, its ``columns`` and a
    row per model (``rows[model][column]``, None where nothing was scored); ``incomplete`` names
    the AVG. cells that miss a dataset."""
    order = paper_dataset_order(datasets)
    out = []
    for name, table_lengths in PAPER_TABLES:
        present = [n for n in table_lengths if n in lengths]
        if not present:
            continue
        columns = [f"{format_length(n)} {PAPER_DATASET_NAMES.get(ds, ds)}" for n in present for ds in order + ["AVG."]]
        columns.append("AVG.")
        rows, incomplete = {}, {}
        for model, data in table.items():
            row: dict = {}
            for n in present:
                lab = format_length(n)
                entry = data["lengths"].get(lab, {"datasets": {}, "AVG": None, "complete": False})
                for ds in order:
                    row[f"{lab} {PAPER_DATASET_NAMES.get(ds, ds)}"] = entry["datasets"].get(ds, {}).get("score")
                row[f"{lab} AVG."] = entry["AVG"]
                if entry["AVG"] is not None and not entry.get("complete", True):
                    incomplete.setdefault(model, []).append(f"{lab} AVG.")
            row["AVG."] = _mean([row[f"{format_length(n)} AVG."] for n in present
                                 if row[f"{format_length(n)} AVG."] is not None])
            if row["AVG."] is not None and (incomplete.get(model) or
                                            any(row[f"{format_length(n)} AVG."] is None for n in present)):
                incomplete.setdefault(model, []).append("AVG.")
            rows[model] = row
        out.append({"table": name, "lengths": [format_length(n) for n in present], "datasets": order,
                    "columns": columns, "rows": rows, "incomplete": incomplete})
    return out


def render_paper_table(paper: dict) -> list[str]:
    """Markdown lines of one paper table (an incomplete AVG. is marked with *)."""
    over = paper.get("average_over", paper["lengths"])
    lines = [f"### {paper['table']} layout ({', '.join(paper['lengths'])}; AVG. over "
             f"{' and '.join(over) or '–'})", "", "| Model | " + " | ".join(paper["columns"]) + " |",
             "|---" * (len(paper["columns"]) + 1) + "|"]
    for model, row in paper["rows"].items():
        marks = set(paper["incomplete"].get(model, ()))
        cells = [_fmt(row.get(c)) + ("*" if c in marks else "") for c in paper["columns"]]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if paper["incomplete"]:
        lines += ["", "\\* averages over what was scored: a dataset or length is missing."]
    return lines + [""]


def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _delta(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def render_markdown(report: dict) -> str:
    lines = ["# Evaluation report", ""]
    labels = report["length_labels"]
    over = ", ".join(format_length(n) for n in report["overall_lengths"])
    lines.append(f"Models: {', '.join(report['models'])}. Scores are x100; AVG is the macro average over "
                 f"datasets, overall the macro average over {over}. Baseline for differences: {report['baseline']}.")
    lines.append("")
    for suite in report["suites"].values():
        models, datasets, base = suite["models"], suite["datasets"], report["baseline"]
        lines += [f"## {suite['title']}", ""]
        if suite.get("note"):
            lines += [suite["note"], ""]
        for paper in suite.get("paper_tables", ()):
            lines += render_paper_table(paper)
        lines += ["### Average by length", ""]
        lines.append("| model | " + " | ".join(labels) + " | overall |")
        lines.append("|---" * (len(labels) + 2) + "|")
        for model, data in models.items():
            cells = [_fmt(data["lengths"].get(lab, {}).get("AVG")) for lab in labels]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {_fmt(data['overall'])} |")
        for model, data in models.items():
            if model == base or base not in models:
                continue
            ref = models[base]
            cells = [_fmt(_delta(data["lengths"].get(lab, {}).get("AVG"), ref["lengths"].get(lab, {}).get("AVG")), True)
                     for lab in labels]
            lines.append(f"| Δ {model} − {base} | " + " | ".join(cells)
                         + f" | {_fmt(_delta(data['overall'], ref['overall']), True)} |")
        lines.append("")
        for lab in labels:
            lines += [f"### {lab}", "", "| model | " + " | ".join(datasets) + " | AVG |",
                      "|---" * (len(datasets) + 2) + "|"]
            for model, data in models.items():
                entry = data["lengths"].get(lab, {"datasets": {}, "AVG": None})
                cells = [_fmt(entry["datasets"].get(ds, {}).get("score")) for ds in datasets]
                lines.append(f"| {model} | " + " | ".join(cells) + f" | {_fmt(entry['AVG'])} |")
            lines.append("")
        lines += ["### Counts", "", "| model | dataset | length | n | mean tokens | errors | empty | judge fallbacks "
                  "| unparsed judge replies |", "|---|---|---|---|---|---|---|---|---|"]
        excluded = []
        for model, data in models.items():
            for lab in labels:
                for ds, cell in data["lengths"].get(lab, {"datasets": {}})["datasets"].items():
                    lines.append(f"| {model} | {ds} | {lab} | {cell['n']} | {cell['mean_tokens']:.0f} | "
                                 f"{cell['errors']} | {cell['empty']} | {cell['judge_fallbacks']} | "
                                 f"{cell.get('judge_unparsed', 0)} |")
                    if cell.get("failed_excluded"):
                        excluded.append(f"- {model} / {ds} / {lab}: {cell['failed_excluded']} failed "
                                        f"generations excluded")
        if excluded:
            lines += ["", "MMLongBench data: failed generations are left out of the average, as the official "
                      "run does (n counts the records averaged).", ""] + excluded
        depth_rows = [(m, lab, ds, c["by_depth"]) for m, d in models.items() for lab in labels
                      for ds, c in d["lengths"].get(lab, {"datasets": {}})["datasets"].items() if "by_depth" in c]
        if depth_rows:
            depths = sorted({k for *_, bd in depth_rows for k in bd}, key=float)
            lines += ["", "### By needle depth", "", "| model | dataset | length | " + " | ".join(depths) + " |",
                      "|---" * (len(depths) + 3) + "|"]
            for m, lab, ds, bd in depth_rows:
                lines.append(f"| {m} | {ds} | {lab} | " + " | ".join(_fmt(bd.get(k)) for k in depths) + " |")
        lines.append("")
    dropped = report.get("dropped")
    if dropped:
        lines += ["## Dropped", "", "| dataset | reason | count |", "|---|---|---|"]
        for ds, reasons in sorted(dropped.items()):
            for reason, count in sorted(reasons.items()):
                lines.append(f"| {ds} | {reason} | {count} |")
        lines.append("")
    return "\n".join(lines)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def plot_panels(report: dict) -> list[tuple[str, dict, Optional[str]]]:
    """(title, suite, dataset or None for the suite's AVG) per panel: each suite's AVG, then each
    dataset; a suite with one dataset gets one panel (its AVG is that dataset's curve)."""
    panels: list[tuple[str, dict, Optional[str]]] = []
    for suite in report["suites"].values():
        if len(suite["datasets"]) == 1:
            panels.append((f"{suite['title']}: {suite['datasets'][0]}", suite, suite["datasets"][0]))
            continue
        panels.append((f"{suite['title']}: AVG", suite, None))
        panels.extend((ds, suite, ds) for ds in suite["datasets"])
    return panels


def model_styles(models: Sequence[str]) -> dict[str, dict]:
    """A distinct look per model, so a curve that equals another's stays visible: its own marker and
    line style, a marker size that shrinks with the model's index (the first is drawn largest,
    underneath), and a small sideways offset (a fraction of a doubling on the log2 length axis)."""
    n = len(models)
    styles = {}
    for i, model in enumerate(models):
        styles[model] = {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                         "markersize": max(3.5, 8.0 - 1.5 * i), "zorder": 2 + i,
                         "x_factor": 2 ** (0.06 * (i - (n - 1) / 2)) if n > 1 else 1.0}
    return styles


def style_length_axes(ax, lengths: Sequence[int], labels: Sequence[str], title: str, margin: float,
                      ylabel: str, fontsize: int) -> None:
    """A score-vs-context-length panel: log2 x axis ticked at the lengths, scores 0-100, light grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels(labels, rotation=45 if len(lengths) > 5 else 0)
    ax.minorticks_off()
    if len(lengths) > 1:
        ax.set_xlim(lengths[0] / margin, lengths[-1] * margin)
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_curves(report: dict, path: str) -> str:
    """Score vs length, one line per model (see :func:`plot_panels` and :func:`model_styles`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(report)
    cols = min(4, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.4), squeeze=False)
    lengths, labels = report["lengths"], report["length_labels"]
    models = list(report.get("models") or [])
    for suite in report["suites"].values():
        models.extend(m for m in suite["models"] if m not in models)
    styles = model_styles(models)
    for ax, (title, suite, ds) in zip(axes.flat, panels):
        for model, data in suite["models"].items():
            xs, ys = [], []
            for n, lab in zip(lengths, labels):
                entry = data["lengths"].get(lab)
                if entry is None:
                    continue
                value = entry["AVG"] if ds is None else entry["datasets"].get(ds, {}).get("score")
                if value is not None:
                    xs.append(n * styles[model]["x_factor"])
                    ys.append(value)
            style = styles[model]
            ax.plot(xs, ys, marker=style["marker"], linestyle=style["linestyle"], markersize=style["markersize"],
                    zorder=style["zorder"], linewidth=1.6, markerfacecolor="none" if style["zorder"] > 2 else None,
                    markeredgewidth=1.4, label=model)
        style_length_axes(ax, lengths, labels, title, margin=2 ** 0.35, ylabel="score", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(4, max(1, len(names))), fontsize=8, frameon=False)
    top = 1 - 0.32 / (3.6 * rows + 0.4) * (1 + (len(names) - 1) // 4)  # room for the legend rows
    fig.tight_layout(rect=(0, 0, 1, top))
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_report(records: Iterable[dict], out_dir: str, models: Optional[Sequence[str]] = None,
                 overall_lengths: Optional[Sequence[int]] = None, baseline: Optional[str] = None,
                 dropped: Optional[dict] = None, plot: bool = True, mmlb_datasets: Iterable[str] = ()) -> dict:
    """report.json, report.md and eval_curve.png under ``out_dir``; returns the report dict."""
    report = summarize(records, models, overall_lengths, baseline, dropped, mmlb_datasets)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(os.path.join(out_dir, "report.json"), report)
    atomic_write_bytes(os.path.join(out_dir, "report.md"), (render_markdown(report) + "\n").encode("utf-8"))
    if plot and report["suites"]:
        plot_curves(report, os.path.join(out_dir, "eval_curve.png"))
    return report


__all__ = ["PAPER_DATASET_NAMES", "PAPER_TABLES", "model_styles", "paper_dataset_order", "paper_tables",
           "plot_curves", "plot_panels", "render_markdown", "render_paper_table", "summarize", "write_report"]
