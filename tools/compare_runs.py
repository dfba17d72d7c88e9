#!/usr/bin/env python
"""Compare several runs' evaluation reports in the paper's table layout, with the paper's numbers.

  python tools/compare_runs.py --run NAME=EVAL_DIR [--run NAME=EVAL_DIR ...] --output DIR \\
      [--paper-table table1|table2|table3|table16|fig2|none] [--match NAME=ROW ...] [--title T] \\
      [--overall-lengths 64K,128K] [--report-model NAME=MODEL]

EVAL_DIR is a tools/evaluate.py output folder (or its report.json). Writes DIR/comparison.md,
DIR/comparison.csv and DIR/comparison.png. Rows are the runs in the order given; columns as the
paper (MMLB-D, LD-URL, SLIDE, AVG. at each of --overall-lengths, then AVG. over them), then any other
lengths the reports have. With --paper-table, a run named after one of the table's rows (letters
and digits compared, case ignored: ocr_full = OCR-full, ratio_8_2 = 8:2, short_20 = 20%,
extract_single_long = extract-single long-biased, reasoning_rope8e6 = reasoning base 8e6,
base = Qwen2.5-VL-7B), or given one with --match NAME=ROW, gets the published row and the
difference under it. Tables: table1 (tasks), table2 (ratios), table3 = table15 = fig3 (short
data), table4, table5 (256K/512K), table14 = fig2 (length distribution), table16 (mRoPE base).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron_vlm.eval.published import TABLE_CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="NAME=EVAL_DIR",
                   help="a run: its name (a row of the table) and its tools/evaluate.py output folder (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for comparison.{md,csv,png}")
    p.add_argument("--paper-table", default="none", choices=TABLE_CHOICES,
                   help="the paper's table whose published rows are shown next to matching runs (default: none)")
    p.add_argument("--match", action="append", default=[], metavar="NAME=ROW",
                   help="match run NAME to the paper row ROW (its label, e.g. OCR-full, 8:2, 20%%; none: no row)")
    p.add_argument("--overall-lengths", default=None, metavar="64K,128K",
                   help="lengths of the overall AVG., which also lead the table in the paper's layout (None: the "
                        "paper table's, else 64K and 128K as the paper)")
    p.add_argument("--report-model", action="append", default=[], metavar="NAME=MODEL",
                   help="the model of run NAME's report when it holds several")
    p.add_argument("--title", default=None, help="title of the table and the figure")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from dataclasses import replace

    from megatron_vlm.eval.build import parse_lengths
    from megatron_vlm.eval.compare import CompareError, compare, parse_pairs, parse_run_spec, write_comparison

    try:
        specs = [parse_run_spec(text) for text in args.run]
        models = parse_pairs(args.report_model, "--report-model")
        unknown = sorted(set(models) - {s.name for s in specs})
        if unknown:
            raise CompareError(f"--report-model names {', '.join(unknown)}, which no --run has")
        specs = [replace(s, model=models.get(s.name)) for s in specs]
        try:
            lengths = parse_lengths(args.overall_lengths) if args.overall_lengths else None
        except ValueError as exc:
            raise CompareError(f"--overall-lengths: {exc}") from exc
        comparison = compare(specs, args.paper_table, parse_pairs(args.match, "--match"), lengths, args.title)
    except CompareError as exc:
        raise cli.UserError(str(exc)) from exc
    for warning in comparison.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    paths = write_comparison(comparison, args.output)
    matched = ", ".join(f"{run} = {row.label}" for run, row in comparison.matched.items())
    print(f"{len(comparison.runs)} runs" + (f"; paper rows: {matched}" if matched else ""))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
