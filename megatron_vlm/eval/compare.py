"""Several runs' evaluation reports side by side in the paper's layout, with the paper's published
row for each run where the setting matches (``tools/compare_runs.py``).

One row per run, in the order given; columns as the paper's tables: per length (64K and 128K by
default, or the chosen paper table's) MMLB-D, LD-URL, SLIDE and AVG., then the overall AVG. over
those lengths; lengths that some report has beyond those follow. Scores are read from each
report.json (``tools/evaluate.py`` output, ``suites.docqa``); the AVG. of a length is recomputed
here as the macro average over MMLongBench's datasets (over every dataset when a comparison has
none of them), so runs whose reports hold other datasets too stay comparable with the paper;
other datasets are shown, not averaged. An AVG. over fewer datasets (or lengths) than the
comparison has is marked ``*``. Missing cells are "–" (empty in the CSV), never 0.

Matching a run to a published row (:mod:`megatron_vlm.eval.published`): an explicit
``matches[run] = row`` (``--match NAME=ROW``; ``ROW`` ``none`` for no row) wins; otherwise a run
whose name has the same :func:`~megatron_vlm.eval.published.row_key` as a row's label or alias
(``ocr_full`` -> Table 1's ``OCR-full``, ``ratio_8_2`` -> Table 2's ``8:2``, ``base`` ->
``Qwen2.5-VL-7B``). Under a matched run come the paper's row and the difference (run - paper).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from megatron_vlm.common.storage import atomic_write_bytes
from megatron_vlm.eval.build import format_length, parse_length
from megatron_vlm.eval.published import (AVG, SHORT_CONTEXT_COLUMNS, SHORT_CONTEXT_TABLE3, PublishedRow,
                                         PublishedTable, published_table)
from megatron_vlm.eval.report import PAPER_DATASET_NAMES, model_styles, paper_dataset_order, style_length_axes

DEFAULT_LENGTHS = (64 * 1024, 128 * 1024)
OUTPUTS = ("comparison.md", "comparison.csv", "comparison.png")


class CompareError(ValueError):
    """Bad input to a comparison (missing report, no runs, unknown row): the message says what to do."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    path: str  # an evaluation folder or its report.json
    model: Optional[str] = None  # which model of a several-model report


def parse_run_spec(text: str) -> RunSpec:
    """``NAME=EVAL_DIR`` (or ``NAME=.../report.json``)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise CompareError(f"--run {text!r}: expected NAME=EVAL_DIR (a tools/evaluate.py output folder)")
    return RunSpec(name.strip(), path.strip())


def parse_pairs(items: Iterable[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` flags (``--match``, ``--report-model``) -> {NAME: VALUE}."""
    out = {}
    for text in items:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise CompareError(f"{flag} {text!r}: expected NAME=VALUE, NAME being a --run name")
        out[name.strip()] = value.strip()
    return out


@dataclass
class RunScores:
    name: str
    report_path: str
    model: str
    scores: dict  # length (tokens) -> {dataset: score x100}
    lengths: list  # lengths the report has for this model (tokens, ascending)


def report_path_of(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, "report.json")
    return path


def load_run(spec: RunSpec) -> RunScores:
    """The document-QA scores of one run's model from its report.json."""
    path = report_path_of(spec.path)
    if not os.path.exists(spec.path):
        raise CompareError(f"run {spec.name}: {spec.path} does not exist (give a tools/evaluate.py output folder)")
    if not os.path.isfile(path):
        raise CompareError(f"run {spec.name}: no report.json in {spec.path} (run tools/evaluate.py with "
                           f"--output {spec.path}, or point --run at the folder that has report.json)")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"run {spec.name}: cannot read {path}: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("suites"), dict):
        raise CompareError(f"run {spec.name}: {path} is not a tools/evaluate.py report (no 'suites')")
    models = [m for m in report.get("models") or [] if isinstance(m, str)]
    suite = report["suites"].get("docqa") or {"models": {}}
    if spec.model is not None:
        model = spec.model
        if model not in models:
            raise CompareError(f"run {spec.name}: {path} has no model {model!r} (it has {', '.join(models) or 'none'})")
    elif len(models) == 1:
        model = models[0]
    elif spec.name in models:
        model = spec.name
    else:
        raise CompareError(f"run {spec.name}: {path} holds models {', '.join(models) or '(none)'}: say which with "
                           f"--report-model {spec.name}=MODEL")
    data = suite.get("models", {}).get(model, {"lengths": {}})
    scores: dict = {}
    for label, entry in data.get("lengths", {}).items():
        row = {ds: cell["score"] for ds, cell in (entry.get("datasets") or {}).items()
               if cell.get("score") is not None}
        if row:
            scores[parse_length(label)] = row
    return RunScores(spec.name, path, model, scores, sorted(scores))


@dataclass
class Row:
    kind: str  # "run", "paper" or "diff"
    name: str  # run name ("" for a paper row no run matched)
    label: str  # what the first column shows
    values: dict  # column -> value or None
    incomplete: set = field(default_factory=set)  # columns averaged over fewer datasets/lengths


@dataclass
class Comparison:
    title: str
    lengths: list  # the main lengths (tokens): the paper's layout and the overall AVG.
    extra_lengths: list  # lengths some report has beyond those
    datasets: list  # dataset keys, paper order then others
    avg_datasets: list  # the datasets every AVG. is over
    table: Optional[PublishedTable]
    runs: list  # RunScores, in the order given
    matched: dict  # run name -> PublishedRow
    rows: list  # Row: per run its own row, then (if matched) paper and diff
    unmatched_paper: list  # Row: the table's rows no run matched
    warnings: list

    @property
    def main_columns(self) -> list[str]:
        return [c for n in self.lengths for c in length_columns(n, self.datasets)] + [AVG]

    @property
    def extra_columns(self) -> list[str]:
        return [c for n in self.extra_lengths for c in length_columns(n, self.datasets)]

    @property
    def columns(self) -> list[str]:
        return self.main_columns + self.extra_columns


def dataset_column(dataset: str) -> str:
    return PAPER_DATASET_NAMES.get(dataset, dataset)


def length_columns(length: int, datasets: Sequence[str]) -> list[str]:
    """``64K MMLB-D``, ``64K LD-URL``, ``64K SLIDE``, (others), ``64K AVG.``: the paper's names."""
    lab = format_length(length)
    return [f"{lab} {dataset_column(ds)}" for ds in datasets] + [f"{lab} {AVG}"]


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _run_values(run: RunScores, lengths: Sequence[int], extra: Sequence[int], datasets: Sequence[str],
                avg_datasets: Sequence[str]) -> tuple[dict, set]:
    values, incomplete = {}, set()
    per_length_avg = {}
    for n in list(lengths) + list(extra):
        lab = format_length(n)
        cells = run.scores.get(n, {})
        for ds in datasets:
            values[f"{lab} {dataset_column(ds)}"] = cells.get(ds)
        present = [cells[ds] for ds in avg_datasets if cells.get(ds) is not None]
        avg = _mean(present)
        values[f"{lab} {AVG}"] = avg
        if avg is not None and len(present) < len(avg_datasets):
            incomplete.add(f"{lab} {AVG}")
        per_length_avg[n] = avg
    main = [per_length_avg[n] for n in lengths if per_length_avg[n] is not None]
    values[AVG] = _mean(main)
    if values[AVG] is not None and (len(main) < len(lengths) or
                                    any(f"{format_length(n)} {AVG}" in incomplete for n in lengths)):
        incomplete.add(AVG)
    return values, incomplete


def _paper_values(row: PublishedRow, datasets: Sequence[str]) -> dict:
    values = {}
    for n, cells in row.scores.items():
        lab = format_length(n)
        for ds in datasets:
            values[f"{lab} {dataset_column(ds)}"] = cells.get(ds)
        values[f"{lab} {AVG}"] = cells.get(AVG)
    values[AVG] = row.overall
    return values


def _match(runs: Sequence[RunScores], table: Optional[PublishedTable], matches: dict) -> dict:
    names = {r.name for r in runs}
    unknown = sorted(set(matches) - names)
    if unknown:
        raise CompareError(f"--match names {', '.join(unknown)}, which no --run has (runs: {', '.join(sorted(names))})")
    if table is None:
        if matches:
            raise CompareError("--match needs --paper-table (which table's rows to match)")
        return {}
    out = {}
    for run in runs:
        wanted = matches.get(run.name)
        if wanted is not None and wanted.lower() == "none":
            continue
        row = table.row(wanted if wanted is not None else run.name)
        if row is None and wanted is not None:
            raise CompareError(f"--match {run.name}={wanted}: {table.source} has no such row (rows: "
                               f"{', '.join(r.label for r in table.rows)})")
        if row is not None:
            out[run.name] = row
    return out


def compare(specs: Sequence[RunSpec], paper_table: str = "none", matches: Optional[dict] = None,
            lengths: Optional[Sequence[int]] = None, title: Optional[str] = None) -> Comparison:
    """Load every run's report and build the comparison (see the module docstring)."""
    if not specs:
        raise CompareError("no runs to compare: give at least one --run NAME=EVAL_DIR")
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise CompareError(f"run name {spec.name!r} is given twice: every --run needs its own NAME")
        seen.add(spec.name)
    try:
        table = published_table(paper_table or "none")
    except ValueError as exc:
        raise CompareError(str(exc)) from exc
    runs = [load_run(spec) for spec in specs]
    main = sorted(set(lengths)) if lengths else list(table.lengths if table else DEFAULT_LENGTHS)
    have = sorted({n for run in runs for n in run.lengths})
    extra = [n for n in have if n not in main]
    datasets = paper_dataset_order(sorted({ds for run in runs for cells in run.scores.values() for ds in cells}))
    if not datasets:
        raise CompareError("no document-QA scores in any report: " + ", ".join(f"{r.name} ({r.report_path})"
                                                                            for r in runs))
    mmlb = [ds for ds in datasets if ds in PAPER_DATASET_NAMES]
    avg_datasets = mmlb or list(datasets)
    warnings = []
    for run in runs:
        missing = [n for n in main if n not in run.scores]
        if not run.scores:
            warnings.append(f"run {run.name}: {run.report_path} has no document-QA scores for model {run.model}; "
                            f"its cells are shown as –")
        elif missing:
            warnings.append(f"run {run.name}: {run.report_path} has no {', '.join(map(format_length, missing))} "
                            f"results (it has {', '.join(map(format_length, run.lengths))}); those cells are – and "
                            f"its AVG. is over the lengths it has")
        gaps = [f"{format_length(n)} {dataset_column(ds)}" for n in main if n in run.scores
                for ds in avg_datasets if ds not in run.scores[n]]
        if gaps:
            warnings.append(f"run {run.name}: {run.report_path} lacks {', '.join(gaps)}; the AVG. there is over "
                            f"the datasets it has (marked *)")
    matched = _match(runs, table, dict(matches or {}))
    rows = []
    for run in runs:
        values, incomplete = _run_values(run, main, extra, datasets, avg_datasets)
        rows.append(Row("run", run.name, run.name, values, incomplete))
        paper = matched.get(run.name)
        if paper is not None:
            pv = _paper_values(paper, datasets)
            rows.append(Row("paper", run.name, f"↳ paper: {paper.label} ({paper.source})", pv))
            # no difference where the run's AVG. is over fewer datasets or lengths than the paper's
            diff = {c: (values[c] - pv[c]) if values.get(c) is not None and pv.get(c) is not None
                    and c not in incomplete else None for c in values}
            rows.append(Row("diff", run.name, f"↳ Δ {run.name} − paper", diff))
    used = {id(r) for r in matched.values()}
    unmatched = [Row("paper", "", f"{r.label} ({r.source})", _paper_values(r, datasets))
                 for r in (table.rows if table else ()) if id(r) not in used]
    if table is not None and not matched:
        warnings.append(f"no run matched a row of {table.source}: name runs after its rows "
                        f"({', '.join(r.label for r in table.rows)}) or pass --match NAME=ROW")
    default_title = "Long-document VQA (MMLongBench)" + (f" vs the paper's {table.source}" if table else "")
    return Comparison(title or default_title, main, extra, datasets, avg_datasets, table, runs, matched, rows,
                      unmatched, warnings)


# --------------------------------------------------------------------------------- rendering
def _fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _md_table(rows: Sequence[Row], columns: Sequence[str], first: str = "Run") -> list[str]:
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [_fmt(row.values.get(c), signed=row.kind == "diff") + ("*" if c in row.incomplete else "")
                 for c in columns]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(comp: Comparison) -> str:
    lengths = " and ".join(format_length(n) for n in comp.lengths)
    avg_over = ", ".join(dataset_column(ds) for ds in comp.avg_datasets)
    lines = [f"# {comp.title}", "",
             f"Runs: {', '.join(f'{r.name} ({r.report_path}, model {r.model})' for r in comp.runs)}.", "",
             f"Scores x100. A length's AVG. is the macro average over {avg_over}; the last AVG. is the "
             f"average over {lengths}. – : not evaluated. * : averaged over fewer datasets or lengths.", ""]
    if comp.table is not None:
        lines += [f"Paper: {comp.table.source} ({comp.table.title}); under each matched run its published row "
                  f"and the difference (run − paper).", ""]
    lines += _md_table(comp.rows, comp.main_columns) + [""]
    others = [ds for ds in comp.datasets if ds not in comp.avg_datasets]
    if others:
        lines += [f"Not in the AVG.: {', '.join(others)} (not one of the paper's datasets).", ""]
    if comp.extra_lengths:
        labels = ", ".join(format_length(n) for n in comp.extra_lengths)
        lines += [f"## Other lengths ({labels})", ""]
        lines += _md_table([r for r in comp.rows if r.kind == "run"], comp.extra_columns) + [""]
    if comp.unmatched_paper:
        lines += [f"## Other rows of {comp.table.source} (paper)", ""]
        lines += _md_table(comp.unmatched_paper, comp.main_columns, first="Paper row") + [""]
    if comp.table is not None and comp.table.key == "table15":
        lines += ["## Table 3 (paper): short-context benchmarks of the same runs", "",
                  "Not measured by tools/evaluate.py; shown for reference.", "",
                  "| Short data | " + " | ".join(SHORT_CONTEXT_COLUMNS) + " |",
                  "|---" * (len(SHORT_CONTEXT_COLUMNS) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |"
                  for label, values in SHORT_CONTEXT_TABLE3.items()] + [""]
    if comp.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in comp.warnings] + [""]
    return "\n".join(lines)


def csv_header(comp: Comparison) -> list[str]:
    return ["run", "kind", "paper row"] + comp.columns + ["incomplete"]


def render_csv(comp: Comparison) -> str:
    """One line per run, paper row and difference; the paper's column names; missing cells empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(comp))
    for row in comp.rows + comp.unmatched_paper:
        paper = comp.matched.get(row.name).label if row.name in comp.matched else \
            (row.label.rsplit(" (", 1)[0] if row.kind == "paper" else "")
        values = ["" if row.values.get(c) is None else f"{row.values[c]:.4f}" for c in comp.columns]
        marked = " ".join(c for c in comp.columns if c in row.incomplete)
        writer.writerow([row.name, row.kind, paper] + values + [marked])
    return buffer.getvalue()


def plot(comp: Comparison, path: str) -> str:
    """Per dataset and the AVG.: score vs length, one line per run (report.py's marker and line
    styles), the matched paper values as large hollow stars in the run's colour; a last panel of
    grouped bars: each run's overall AVG. next to the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = [r.name for r in comp.runs]
    styles = model_styles(names)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    lengths = sorted(comp.lengths + comp.extra_lengths)
    panels = [(f"AVG. ({', '.join(dataset_column(d) for d in comp.avg_datasets)})", AVG)]
    panels += [(dataset_column(ds), ds) for ds in comp.datasets]
    n_panels = len(panels) + 1
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + 0.8), squeeze=False)
    run_rows = {r.name: r for r in comp.rows if r.kind == "run"}
    paper_rows = {r.name: r for r in comp.rows if r.kind == "paper"}
    for ax, (title, key) in zip(axes.flat, panels):
        for name in names:
            values = run_rows[name].values
            xs, ys = [], []
            for n in lengths:
                v = values.get(f"{format_length(n)} {key if key == AVG else dataset_column(key)}")
                if v is not None:
                    xs.append(n * styles[name]["x_factor"])
                    ys.append(v)
            st = styles[name]
            ax.plot(xs, ys, marker=st["marker"], linestyle=st["linestyle"], markersize=st["markersize"],
                    zorder=st["zorder"], linewidth=1.6, color=colors[name], label=name)
            if name in paper_rows:
                pv = paper_rows[name].values
                pts = [(n, pv.get(f"{format_length(n)} {key if key == AVG else dataset_column(key)}"))
                       for n in lengths]
                pts = [(n * styles[name]["x_factor"], v) for n, v in pts if v is not None]
                if pts:
                    ax.scatter(*zip(*pts), marker="*", s=170, facecolors="none", edgecolors=[colors[name]],
                               linewidths=1.5, zorder=20)
        style_length_axes(ax, lengths, [format_length(n) for n in lengths], title, margin=2 ** 0.5,
                          ylabel="score (x100)", fontsize=10)
    ax = list(axes.flat)[len(panels)]
    width = 0.38
    for i, name in enumerate(names):
        ours = run_rows[name].values.get(AVG)
        paper = paper_rows[name].values.get(AVG) if name in paper_rows else None
        if ours is not None:
            mark = "*" if AVG in run_rows[name].incomplete else ""
            ax.bar(i - width / 2, ours, width, color=colors[name])
            ax.text(i - width / 2, ours + 1, f"{ours:.1f}{mark}", ha="center", fontsize=8)
        if paper is not None:
            ax.bar(i + width / 2, paper, width, color="white", edgecolor=colors[name], hatch="//")
            ax.text(i + width / 2, paper + 1, f"{paper:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                       fontsize=8)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylim(0, 105)
    ax.set_title(f"overall AVG. ({' and '.join(format_length(n) for n in comp.lengths)}): run (solid) vs paper "
                 "(hatched)\n* over fewer datasets or lengths", fontsize=9)
    ax.set_ylabel("score (x100)")
    ax.grid(True, axis="y", alpha=0.3)
    for extra_ax in list(axes.flat)[n_panels:]:
        extra_ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if comp.matched:
        handles.append(Line2D([], [], marker="*", linestyle="none", markersize=12, markerfacecolor="none",
                              markeredgecolor="0.3", label=f"paper ({comp.table.source}), run's colour"))
        labels.append(handles[-1].get_label())
    ncol = min(4, max(1, len(labels)))
    fig.suptitle(comp.title, fontsize=12)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.45 / (4.0 * rows + 0.8)),
               ncol=ncol, fontsize=9, frameon=False)
    legend_rows = 1 + (len(labels) - 1) // ncol
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.25 * legend_rows) / (4.0 * rows + 0.8)))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_comparison(comp: Comparison, out_dir: str) -> list[str]:
    """comparison.md, comparison.csv and comparison.png under ``out_dir`` (each written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    md, table, png = (os.path.join(out_dir, name) for name in OUTPUTS)
    atomic_write_bytes(md, (render_markdown(comp) + "\n").encode("utf-8"))
    atomic_write_bytes(table, render_csv(comp).encode("utf-8"))
    plot(comp, png)
    return [md, table, png]


__all__ = ["CompareError", "Comparison", "DEFAULT_LENGTHS", "Row", "RunScores", "RunSpec", "compare", "csv_header",
           "length_columns", "load_run", "parse_pairs", "parse_run_spec", "plot", "render_csv", "render_markdown",
           "write_comparison"]
