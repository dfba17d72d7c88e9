#!/usr/bin/env python
"""Build (or extend, or resume) a document pool: PDFs -> page images, layout blocks, token counts.

  python tools/build_doc_pool.py --input PDFS_DIR more.pdf 'glob/**/*.pdf' list.txt --output POOL \
      [--dpi 144] [--min-pages 20] [--max-pages 200] [--image-format jpeg|png|webp] [--workers N] \
      [--shard I/N | --shard slurm] [--exclude-hashes FILE] [--ocr] [--doc-timeout 600]
  python tools/build_doc_pool.py --output POOL --merge-only --num-shards N

A rerun skips finished documents. With ``--shard I/N`` each array task writes
``POOL/shards/*-I-of-N.*``; the task that finishes last merges (or run ``--merge-only``). Output:
``POOL/manifest.jsonl``, ``POOL/report.json``, ``POOL/stats.json`` (see megatron_vlm/pool/records.py).
On Slurm: ``sbatch --array=0-63 --cpus-per-task=16 --wrap "python tools/build_doc_pool.py --input
pdfs.txt --output POOL --workers 16 --shard slurm"``; resubmitting the same array resumes it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from megatron_vlm import cli  # noqa: E402
from megatron_vlm.pool.pdf import PdfLimits  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], metavar="PATH",
                   help="PDF files, folders (recursive), globs, or text files listing paths")
    p.add_argument("--output", required=True, metavar="POOL", help="pool folder")
    g = p.add_argument_group("rendering and filtering")
    g.add_argument("--dpi", type=float, default=144.0, help="render resolution (the recipe: 144)")
    g.add_argument("--min-pages", type=int, default=20, help="reject shorter documents")
    g.add_argument("--max-pages", type=int, default=200, help="reject longer documents")
    g.add_argument("--image-format", choices=("jpeg", "png", "webp"), default="jpeg",
                   help="stored page images (jpeg: fastest to encode; webp: smallest)")
    g.add_argument("--image-quality", type=int, default=85, help="jpeg/webp quality")
    g.add_argument("--exclude-hashes", action="append", default=[], metavar="FILE",
                   help="SHA-256 list of documents to exclude (evaluation sets); repeatable")
    g.add_argument("--no-tables", action="store_true", help="skip PyMuPDF table detection")
    g.add_argument("--layout-method", choices=("heuristic", "model"), default="heuristic",
                   help="block labels: text-layer heuristics (default) or PyMuPDF's ONNX layout model "
                        "(~1 page/s per core; tools/bench/layout.py compares them)")
    g = p.add_argument_group("OCR (Tesseract inside PyMuPDF; pages without a usable text layer)")
    g.add_argument("--ocr", action="store_true", help="OCR pages without a usable text layer")
    g.add_argument("--ocr-languages", default="eng", help="Tesseract languages, e.g. eng+chi_sim")
    g.add_argument("--ocr-max-pages", type=int, default=50, help="OCR at most this many pages per document")
    g.add_argument("--ocr-dpi", type=int, default=200, help="resolution of the image given to Tesseract")
    g.add_argument("--broken-text-layer", choices=("ocr", "reject"), default="ocr",
                   help="pages whose text layer is mojibake (e.g. Cyrillic read as Latin-1): ocr = OCR them in "
                        "the script found (needs its Tesseract data, e.g. tesseract-ocr-rus; counts against "
                        "--ocr-max-pages), reject = never; a document with over 10%% of its pages left unread "
                        "is rejected as broken_text_layer")
    g = p.add_argument_group("limits (per page / per document)")
    g.add_argument("--max-file-mb", type=float, default=512.0, help="reject larger files (too_large)")
    g.add_argument("--max-page-pixels", type=int, default=PdfLimits.max_page_pixels,
                   help="render cap; larger pages are rendered at a lower DPI")
    g.add_argument("--max-page-chars", type=int, default=PdfLimits.max_page_chars,
                   help="text kept per page (the rest is dropped, with a warning)")
    g.add_argument("--table-max-chars", type=int, default=PdfLimits.table_max_chars,
                   help="no table detection on pages with more characters")
    g.add_argument("--table-max-paths", type=int, default=PdfLimits.table_max_paths,
                   help="no table detection on pages with more vector path items")
    g.add_argument("--page-analysis-seconds", type=float, default=PdfLimits.analysis_seconds,
                   help="wall-clock budget of table detection per page")
    g.add_argument("--doc-timeout", type=float, default=600.0, help="seconds per document (0: none)")
    g.add_argument("--worker-memory-gb", type=float, default=4.0, help="address-space cap per worker (0: none)")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=cli.default_workers(), help=cli.WORKERS_HELP)
    g.add_argument("--shard", default="0/1", help="I/N (0-based) or 'slurm' (SLURM_ARRAY_TASK_ID/COUNT)")
    g.add_argument("--retry-failed", action="store_true", help="process timed-out/crashed documents again")
    g.add_argument("--no-merge", action="store_true", help="do not merge even when every shard is done")
    g.add_argument("--merge-only", action="store_true", help="only merge finished shards")
    g.add_argument("--num-shards", type=int, default=None, help="with --merge-only: N of the shards")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.merge_only and not args.input:
        p.error("--input is required (unless --merge-only)")
    return args


def config_from_args(args: argparse.Namespace):
    from megatron_vlm.pool.build import PoolConfig

    limits = PdfLimits(
        max_file_bytes=int(args.max_file_mb * 2**20),
        max_page_pixels=args.max_page_pixels,
        max_page_chars=args.max_page_chars,
        table_max_chars=args.table_max_chars,
        table_max_paths=args.table_max_paths,
        analysis_seconds=args.page_analysis_seconds,
    )
    return PoolConfig(
        output=os.path.abspath(args.output), dpi=args.dpi, min_pages=args.min_pages, max_pages=args.max_pages,
        image_format=args.image_format, image_quality=args.image_quality, ocr=args.ocr,
        ocr_languages=args.ocr_languages, ocr_max_pages=args.ocr_max_pages, ocr_dpi=args.ocr_dpi,
        broken_text=args.broken_text_layer, tables=not args.no_tables, layout=args.layout_method, limits=limits, workers=args.workers,
        doc_timeout=args.doc_timeout,
        worker_memory_gb=args.worker_memory_gb, retry_failed=args.retry_failed, progress=not args.no_progress,
    ).validate()


def main(argv=None) -> int:
    from megatron_vlm.common.inputs import parse_shard
    from megatron_vlm.common.locks import lock_path_for, output_lock

    args = parse_args(argv)
    output = os.path.abspath(args.output)
    try:
        shard = (0, 1) if args.merge_only else parse_shard(args.shard)
    except ValueError as err:
        raise cli.UserError(err) from None
    # one writer per output (per shard of it: the tasks of one Slurm array run side by side)
    with output_lock(lock_path_for(output, shard, suffix=""), output):
        return _main(args, output)


def _main(args: argparse.Namespace, output: str) -> int:
    from megatron_vlm.common.inputs import discover_inputs, parse_shard, read_hash_list
    from megatron_vlm.pool.build import format_stats, merge_pool, run_shard, shard_paths, shards_done

    cli.on_stop(lambda: f"stopped: merge of {output} not finished; {cli.RESUME}")
    if args.merge_only:
        count = args.num_shards or parse_shard(args.shard)[1]
        missing = shards_done(output, count)
        if missing:
            print(f"cannot merge: shards {missing} of {count} have not finished", file=sys.stderr)
            return 1
    else:
        try:
            cfg = config_from_args(args)
            index, count = parse_shard(args.shard)
        except ValueError as err:
            raise cli.UserError(err) from None
        missing_inputs: list[str] = []
        paths = discover_inputs(args.input, missing_inputs)
        if not paths:  # nothing to build a pool from is a mistake, not an empty pool
            raise cli.UserError(f"no PDF found under {', '.join(args.input)}")
        files = shard_paths(output, index, count)

        def stopped() -> str:
            done = cli.count_lines(files["manifest"]) + cli.count_lines(files["rejected"])
            return (f"stopped: {done} of {len(set(paths))} documents of shard {index}/{count} done in {output} "
                    f"(accepted or rejected, kept); {cli.RESUME}")

        cli.on_stop(stopped)
        for spec in missing_inputs:
            print(f"warning: no PDF found for input {spec!r}", file=sys.stderr)
        exclude: set[str] = set()
        for path in args.exclude_hashes:
            exclude |= read_hash_list(path)
        try:
            result = run_shard(paths, cfg, (index, count), exclude)
        except ValueError as err:  # e.g. other settings than the existing pool's
            raise cli.UserError(err) from None
        pages_per_s = result.pages / result.seconds if result.seconds else 0.0
        print(f"shard {index}/{count}: {result.inputs} inputs, {result.resumed} already done, "
              f"{result.accepted} accepted, {result.rejected} rejected {result.reasons or ''}; "
              f"{result.pages} pages in {result.seconds:.1f} s ({pages_per_s:.1f} pages/s)", file=sys.stderr)
        missing = shards_done(output, count)
        if args.no_merge or missing:
            if missing:
                print(f"not merging yet: shards {missing} of {count} still running or not started", file=sys.stderr)
            return 0
    stats = merge_pool(output, count)
    print(format_stats(stats))
    print(f"pool: {os.path.join(output, 'manifest.jsonl')} ({stats['documents']} documents); "
          f"report: {os.path.join(output, 'report.json')}; stats: {os.path.join(output, 'stats.json')}")
    if not stats["documents"]:  # an empty pool is a failure, with the reason
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(stats["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
        why = (f"every one of the {stats['rejected']} documents was rejected ({reasons})" if stats["rejected"]
               else "no document was processed")
        print(f"error: the pool is empty: {why}; see {os.path.join(output, 'report.json')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
