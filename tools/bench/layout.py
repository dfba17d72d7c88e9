#!/usr/bin/env python
"""Layout labels on hand-labelled real pages: our text-layer heuristics vs PyMuPDF's ONNX layout
model, per-label precision / recall / F1 and pages/s, both measured in the same run.

  python tools/bench/layout.py [--labels tests/data/layout_labels] [--methods heuristic,model,hybrid]
                               [--split all|tune|heldout] [--iou 0.5] [--repeat 3] [--out bench.json]

Truth: ``labels.json`` (regions with labels, read off rendered pages by hand; SOURCES.md says
which pages were used while tuning the heuristics and which are held out). A block counts as
right when it overlaps a region of the same label with IoU >= --iou (one-to-one).

Timing per page, best of --repeat: heuristic = ``pdf.read_page`` (text layer, tables, images)
+ ``layout.label_document`` over the document's pages; model = ``page.get_layout()`` (the ONNX
model, after a warm-up page) + the text of each region; hybrid = heuristic + the model on the
pages the heuristics flag as unsure. The baseline of every ratio is the model in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_vlm.common.storage import atomic_write_json  # noqa: E402
from megatron_vlm.pool import pdf as pdfmod  # noqa: E402
from megatron_vlm.pool.layout import label_document  # noqa: E402
from megatron_vlm.pool.layout_score import SCORED_LABELS, Score, load_labels  # noqa: E402

DEFAULT_LABELS = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "layout_labels")


def run_heuristic(doc, page_numbers: list[int], method: str) -> tuple[dict[int, list], float]:
    """Labels of the listed pages (1-based) of one document; seconds spent."""
    limits = pdfmod.PdfLimits()
    t0 = time.perf_counter()
    contents = [pdfmod.read_page(doc[n - 1], limits) for n in range(1, doc.page_count + 1)]
    labelled = label_document(contents, (), pdfmod.metadata_title(doc), method=method,
                              pdf_pages=[doc[n - 1] for n in range(1, doc.page_count + 1)])
    seconds = time.perf_counter() - t0
    return {n: [(b.label, b.bbox) for b in labelled[n - 1]] for n in page_numbers}, seconds


def run_model(doc, page_numbers: list[int]) -> tuple[dict[int, list], float]:
    from megatron_vlm.pool.layout_model import model_blocks

    t0 = time.perf_counter()
    out = {}
    for n in range(1, doc.page_count + 1):
        blocks = model_blocks(doc[n - 1])
        if n in page_numbers:
            out[n] = [(b.label, b.bbox) for b in blocks]
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", default=DEFAULT_LABELS, help="folder with labels.json and the page PDFs")
    parser.add_argument("--methods", default="heuristic,model,hybrid")
    parser.add_argument("--split", default="all", choices=("all", "tune", "heldout"))
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3, help="timing runs per method (the best is kept)")
    parser.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    pymupdf = pdfmod.import_pymupdf()
    data = load_labels(args.labels)
    by_file: dict[str, list[dict]] = defaultdict(list)
    for page in data["pages"]:
        by_file[page["file"]].append(page)
    if "model" in methods or "hybrid" in methods:  # load the ONNX model (and warm it up) before timing
        from megatron_vlm.pool.layout_model import model_regions
        with pymupdf.open(os.path.join(args.labels, next(iter(by_file)))) as doc:
            model_regions(doc[0])

    splits = ("tune", "heldout", "all")
    scores = {m: {s: Score() for s in splits} for m in methods}
    per_file = {m: {} for m in methods}
    seconds = {m: 0.0 for m in methods}
    num_pages = 0
    for name, pages in sorted(by_file.items()):
        with pymupdf.open(os.path.join(args.labels, name)) as doc:
            numbers = [p["page"] for p in pages]
            num_pages += doc.page_count
            for method in methods:
                best, result = None, None
                for _ in range(max(1, args.repeat)):
                    if method == "model":
                        result, took = run_model(doc, numbers)
                    else:
                        result, took = run_heuristic(doc, numbers, method)
                    best = took if best is None else min(best, took)
                seconds[method] += best
                per_file[method][name] = Score()
                for page in pages:
                    per_file[method][name].add_page(result[page["page"]],
                                                    [(r["label"], r["bbox"]) for r in page["regions"]], args.iou)
                    truth = [(r["label"], r["bbox"]) for r in page["regions"]]
                    for split in (page["split"], "all"):
                        scores[method][split].add_page(result[page["page"]], truth, args.iou)

    report = {"labels": os.path.abspath(args.labels), "iou": args.iou, "pages": num_pages, "methods": {}}
    base = "model" if "model" in methods else methods[0]
    for method in methods:
        report["methods"][method] = {
            "pages_per_s": round(num_pages / seconds[method], 2) if seconds[method] else None,
            "seconds": round(seconds[method], 3),
            "speed_vs_" + base: round(seconds[base] / seconds[method], 2) if seconds[method] else None,
            **{split: scores[method][split].as_dict() for split in splits},
        }
    shown = ("tune", "heldout") if args.split == "all" else (args.split,)
    for split in shown + (("all",) if args.split == "all" else ()):
        n = sum(1 for p in data["pages"] if split == "all" or p["split"] == split)
        print(f"\n== {split} pages ({n}); P / R / F1 per label, IoU >= {args.iou}")
        header = f"{'label':<10}" + "".join(f"{m:>22}" for m in methods) + f"{'truth':>7}"
        print(header)
        for label in SCORED_LABELS:
            cells = []
            for m in methods:
                c = scores[m][split].labels[label]
                cells.append(f"{c.precision:6.2f} {c.recall:6.2f} {c.f1:6.2f}".rjust(22))
            print(f"{label:<10}" + "".join(cells) + f"{scores[methods[0]][split].labels[label].truth:>7}")
        print(f"{'macro F1':<10}" + "".join(f"{scores[m][split].macro_f1():22.3f}" for m in methods))
    print("\n== macro F1 per document (split)")
    for name, pages in sorted(by_file.items()):
        cells = "".join(f"{per_file[m][name].macro_f1():10.3f}" for m in methods)
        print(f"{name:<28} {pages[0]['split']:<8}{cells}")
    for method in methods:
        report["methods"][method]["per_file_macro_f1"] = {n: round(sc.macro_f1(), 4) for n, sc in per_file[method].items()}
    print(f"\n== speed over {num_pages} pages (best of {args.repeat})")
    for method in methods:
        r = report["methods"][method]
        print(f"{method:<10} {r['pages_per_s']:>8} pages/s  {r['seconds']:>7} s  x{r['speed_vs_' + base]} vs {base}")
    if args.out:
        atomic_write_json(args.out, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
