#!/usr/bin/env python
"""Pages per second of the pool's per-page work in one process, next to poppler's ``pdftoppm``.

  python tools/bench/pdf_render.py [PDF ...] [--dpi 144] [--image-format jpeg] [--max-pages 60]

Ours, per page (what one pool worker does): render with PyMuPDF at the DPI, encode and write the
image, read the text layer / tables / images (``pdf.read_page``), then label blocks and derive
sections per document. Reference: ``pdftoppm -r DPI`` writing the same format (``-jpeg -jpegopt
quality=Q`` or ``-png``) for the same pages, one process, measured in the same run. Prints both
rates and ours / pdftoppm. Without PDF arguments it benchmarks generated reports
(``synthetic_pdfs``); pass real PDFs for real numbers. Without pdftoppm (Debian: poppler-utils)
only our numbers are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron_vlm.pool import pdf as pdfmod  # noqa: E402
from megatron_vlm.pool.layout import label_document  # noqa: E402
from megatron_vlm.pool.sections import document_sections  # noqa: E402
from megatron_vlm.common.storage import atomic_write_bytes  # noqa: E402


def generated_pdfs(folder: str) -> list[str]:
    from megatron_vlm.pool.synthetic_pdfs import ReportSpec, SectionSpec, write_report_pdf

    sections = [SectionSpec("Introduction", 3, bullets=True), SectionSpec("Methods", 5, ("Data", "Setup")),
                SectionSpec("Results", 6, table=True, figure=True), SectionSpec("Discussion", 5)]
    return [write_report_pdf(os.path.join(folder, f"bench_{i}.pdf"), ReportSpec(sections=sections, seed=i))
            for i in range(3)]


def ours(paths: list[str], max_pages: int, dpi: float, image_format: str, quality: int, out: str) -> tuple[int, dict]:
    limits = pdfmod.PdfLimits()
    stages = {"render": 0.0, "encode+write": 0.0, "parse": 0.0, "layout": 0.0}
    pages = 0
    for n, path in enumerate(paths):
        doc = pdfmod.open_pdf(path, limits)
        count = min(doc.page_count, max_pages)
        contents = []
        for i in range(count):
            t0 = time.perf_counter()
            page = pdfmod.load_page(doc, i)
            rendered = pdfmod.render_page(page, dpi, limits)
            t1 = time.perf_counter()
            data = pdfmod.encode_image(rendered, image_format, quality)
            atomic_write_bytes(os.path.join(out, f"{n}-{i:04d}.{pdfmod.IMAGE_SUFFIX[image_format]}"), data)
            t2 = time.perf_counter()
            contents.append(pdfmod.read_page(page, limits))
            t3 = time.perf_counter()
            stages["render"] += t1 - t0
            stages["encode+write"] += t2 - t1
            stages["parse"] += t3 - t2
        t0 = time.perf_counter()
        toc = pdfmod.read_toc(doc, count, limits)
        labelled = label_document(contents, toc, pdfmod.metadata_title(doc))
        document_sections(toc, labelled, count)
        stages["layout"] += time.perf_counter() - t0
        pages += count
        doc.close()
    return pages, stages


def pdftoppm(paths: list[str], max_pages: int, dpi: float, image_format: str, quality: int, out: str) -> float:
    fmt = ["-png"] if image_format == "png" else ["-jpeg", "-jpegopt", f"quality={quality}"]
    start = time.perf_counter()
    for n, path in enumerate(paths):
        count = min(pdfmod.import_pymupdf().open(path).page_count, max_pages)
        subprocess.run(["pdftoppm", "-r", str(dpi), *fmt, "-f", "1", "-l", str(count), path,
                        os.path.join(out, f"p{n}")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pdfs", nargs="*", help="PDFs to benchmark (default: generated reports)")
    p.add_argument("--dpi", type=float, default=144.0)
    p.add_argument("--image-format", choices=("jpeg", "png", "webp"), default="jpeg")
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--max-pages", type=int, default=60, help="pages per PDF")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        paths = args.pdfs or generated_pdfs(tmp)
        ours_dir, ref_dir = os.path.join(tmp, "ours"), os.path.join(tmp, "pdftoppm")
        os.makedirs(ours_dir)
        os.makedirs(ref_dir)
        ours(paths[:1], 2, args.dpi, args.image_format, args.quality, ours_dir)  # warm-up: imports, fonts
        pages, stages = ours(paths, args.max_pages, args.dpi, args.image_format, args.quality, ours_dir)
        total = sum(stages.values())
        rate = pages / total
        print(f"{len(paths)} PDF(s), {pages} pages at {args.dpi:g} DPI, {args.image_format}, one process")
        print(f"ours (render + encode/write + parse + layout): {rate:7.1f} pages/s  "
              + "  ".join(f"{k} {1000 * v / pages:.1f} ms/page" for k, v in stages.items()))
        render_encode = pages / (stages["render"] + stages["encode+write"])
        print(f"ours, render + encode/write only:               {render_encode:7.1f} pages/s")
        if shutil.which("pdftoppm") is None:
            print("pdftoppm not found (Debian/Ubuntu: apt-get install poppler-utils): no reference measured")
            return 0
        ref_fmt = args.image_format if args.image_format != "webp" else "png"
        seconds = pdftoppm(paths, args.max_pages, args.dpi, ref_fmt, args.quality, ref_dir)
        ref_rate = pages / seconds
        print(f"pdftoppm -r {args.dpi:g} ({ref_fmt}, render + encode/write):     {ref_rate:7.1f} pages/s")
        print(f"ratio ours (full) / pdftoppm: {rate / ref_rate:.2f}x;  "
              f"ours (render + encode) / pdftoppm: {render_encode / ref_rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
