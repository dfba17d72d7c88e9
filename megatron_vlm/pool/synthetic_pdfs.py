"""Small PDFs with known structure, written with PyMuPDF, for the doc-pool tests and the quickstart.

Each generator writes a file whose expected pool outcome is known: a multi-section report (outline,
headings, paragraphs, lists, a ruled table, a figure with captions, running header and footer), an
image-only page (needs OCR), a dense "plot" page (must not stall table detection), page-size
fixtures for token counts, and the broken kinds the pool must reject (encrypted, truncated,
not-a-PDF, zero pages). Output is byte-for-byte reproducible (fixed metadata, no new file ID), so
hashes are stable across runs and machines (except the encrypted file: AES salts are random).

    python -m megatron_vlm.pool.synthetic_pdfs OUT_DIR   # the sample set, for demos
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from megatron_vlm.pool.pdf import import_pymupdf

LETTER = (612.0, 792.0)
A4 = (595.0, 842.0)
SLIDE_16_9 = (960.0, 540.0)  # PowerPoint's 13.333 x 7.5 in at 72 pt/in
TINY = (20.0, 24.0)  # 40 x 48 px: below min_pixels, smart_resize grows it
HUGE = (7200.0, 10800.0)  # 100 x 150 in: 14,400 x 21,600 px at 144 DPI before the pixel cap

_FIXED_METADATA = {
    "producer": "megatron-vlm synthetic_pdfs",
    "creator": "megatron-vlm",
    "creationDate": "D:20240101000000Z",
    "modDate": "D:20240101000000Z",
}

_WORDS = {
    "en": (
        "the data model system page document section results analysis method value table figure "
        "report training context long vision language evidence sample review design process study "
        "measure budget revenue growth quarter region market customer product service quality cost "
        "of and to in for with on by from as is are was were this that these which can will may"
    ).split(),
    "de": (
        "der die das und ist ein eine nicht mit von zu den dem des auf für im sich auch es als wird "
        "werden bei Bericht Daten Ergebnisse Analyse Verfahren Tabelle Abbildung Wert Umsatz Jahr "
        "Kunden Markt Qualität Kosten Entwicklung Untersuchung Abschnitt Seite Dokument nach über"
    ).split(),
    "zh": (
        "数据 模型 系统 页面 文档 章节 结果 分析 方法 数值 表格 图表 报告 训练 上下文 长度 视觉 语言 证据 样本 "
        "设计 过程 研究 测量 预算 收入 增长 季度 地区 市场 客户 产品 服务 质量 成本 "
        "我们 这个 一个 可以 进行 以及 由于 因此"
    ).split(),
}
_FONTS = {"en": ("helv", "hebo"), "de": ("helv", "hebo"), "zh": ("china-s", "china-s")}


@dataclass
class SectionSpec:
    """A top-level section: its heading, how many pages it fills, and subsection headings."""

    title: str
    pages: int
    subsections: Sequence[str] = ()
    table: bool = False
    figure: bool = False
    bullets: bool = False


@dataclass
class ReportSpec:
    """What :func:`write_report_pdf` puts into a document."""

    title: str = "Synthetic Technical Report"
    sections: Sequence[SectionSpec] = field(default_factory=lambda: [
        SectionSpec("Introduction", 2, bullets=True),
        SectionSpec("Data and Methods", 3, subsections=("Data Sources", "Processing")),
        SectionSpec("Results", 3, table=True, figure=True),
        SectionSpec("Discussion", 2),
    ])
    language: str = "en"
    page_size: tuple[float, float] = LETTER
    toc: bool = True  # write the PDF outline
    header: Optional[str] = "ACME Research - Internal Report"
    footer: bool = True  # "Page N of M"
    image_only_pages: Sequence[int] = ()  # 1-based pages replaced by a picture of themselves
    seed: int = 0

    @property
    def num_pages(self) -> int:
        return 1 + sum(s.pages for s in self.sections)  # title page + sections


def _sentence(rng: random.Random, language: str) -> str:
    words = [rng.choice(_WORDS[language]) for _ in range(rng.randint(8, 16))]
    if language == "zh":
        return "".join(words) + "。"
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random, language: str, sentences: int) -> str:
    sep = " " if language != "zh" else " "  # spaces let insert_textbox wrap CJK text
    return sep.join(_sentence(rng, language) for _ in range(sentences))


def _save(doc, path: str, **kwargs) -> str:
    """Save reproducibly: fixed metadata, deterministic object order, no random file ID."""
    doc.set_metadata({**doc.metadata, **_FIXED_METADATA, "title": doc.metadata.get("title") or ""})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc.save(path, garbage=3, deflate=True, no_new_id=True, **kwargs)
    doc.close()
    return path


class _PageWriter:
    """Flows text down one page inside the body area; the caller starts new pages."""

    def __init__(self, page, spec: ReportSpec):
        self.page = page
        self.spec = spec
        self.left, self.right = 72.0, page.rect.width - 72.0
        self.y = 80.0
        self.bottom = page.rect.height - 70.0
        self.regular, self.bold = _FONTS[spec.language]

    def text(self, text: str, size: float, bold: bool = False, gap: float = 6.0) -> bool:
        """Write a text box; False (and nothing written) when it does not fit."""
        font = self.bold if bold else self.regular
        height = self.bottom - self.y
        if height < size * 2:
            return False
        rect = (self.left, self.y, self.right, self.bottom)
        left = self.page.insert_textbox(rect, text, fontsize=size, fontname=font, lineheight=1.25)
        if left < 0:  # overflow: PyMuPDF writes nothing
            return False
        self.y = self.bottom - left + gap
        return True

    def table(self, rows: Sequence[Sequence[str]], caption: str) -> None:
        """A ruled table (grid lines) with its caption above, as in most reports."""
        self.text(caption, 10, gap=4)
        col_w = (self.right - self.left) / len(rows[0])
        row_h = 18.0
        top = self.y
        shape = self.page.new_shape()
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                x0, y0 = self.left + c * col_w, top + r * row_h
                shape.draw_rect((x0, y0, x0 + col_w, y0 + row_h))
                font = self.bold if r == 0 else self.regular
                self.page.insert_text((x0 + 4, y0 + 13), cell, fontsize=9.5, fontname=font)
        shape.finish(color=(0, 0, 0), width=0.6)
        shape.commit()
        self.y = top + len(rows) * row_h + 12

    def figure(self, caption: str, seed: int) -> None:
        """A raster 'chart' (a picture: no text layer) with its caption below."""
        pymupdf = import_pymupdf()
        width, height = 160, 90
        rng = random.Random(seed)
        samples = bytearray()
        bars = [rng.randint(10, height - 10) for _ in range(8)]
        for y in range(height):
            for x in range(width):
                bar = bars[x * len(bars) // width]
                inside = (height - y) < bar and (x % (width // len(bars))) > 3
                samples += bytes((40, 90, 160) if inside else (245, 245, 245))
        pix = pymupdf.Pixmap(pymupdf.csRGB, width, height, bytes(samples), False)
        rect = (self.left + 60, self.y, self.right - 60, self.y + 160)
        self.page.insert_image(rect, pixmap=pix)
        self.y += 166
        self.text(caption, 10)


def _running_parts(page, spec: ReportSpec, number: int, total: int) -> None:
    regular = _FONTS[spec.language][0]
    if spec.header:
        page.insert_text((72, 40), spec.header, fontsize=8.5, fontname=regular)
    if spec.footer:
        text = f"Page {number} of {total}"
        x = page.rect.width / 2 - 4.2 * len(text) / 2 * 8.5 / 8
        page.insert_text((x, page.rect.height - 36), text, fontsize=8.5, fontname=regular)


def _fill(writer: _PageWriter, rng: random.Random, language: str) -> None:
    """Fill the rest of a page with paragraphs."""
    while writer.text(_paragraph(rng, language, rng.randint(3, 5)), 10.5):
        pass
    # top up with a short paragraph so that pages look full (and nothing overflows)
    writer.text(_sentence(rng, language), 10.5)


def write_report_pdf(path: str, spec: Optional[ReportSpec] = None) -> str:
    """A multi-section report: title page, numbered sections each starting on a new page.

    Every section fills exactly ``pages`` pages, so its page span is known (the tests compare the
    pool's section structure with it). Subsections start mid-page on the section's pages.
    """
    pymupdf = import_pymupdf()
    spec = spec or ReportSpec()
    rng = random.Random(spec.seed)
    doc = pymupdf.open()
    total = spec.num_pages
    toc: list[list] = []

    def new_page():
        page = doc.new_page(width=spec.page_size[0], height=spec.page_size[1])
        _running_parts(page, spec, doc.page_count, total)
        return _PageWriter(page, spec)

    w = new_page()
    w.y = 150
    w.text(spec.title, 26, bold=True, gap=14)
    w.text("Prepared by the Document Analysis Group", 12, gap=24)
    w.text("Abstract", 12.5, bold=True)
    w.text(_paragraph(rng, spec.language, 5), 10.5)
    toc.append([1, spec.title, 1])

    table_no = figure_no = 0
    for number, section in enumerate(spec.sections, start=1):
        w = new_page()
        heading = f"{number} {section.title}"
        w.text(heading, 16, bold=True, gap=10)
        toc.append([1, heading, doc.page_count])
        subs = list(section.subsections)
        for k in range(section.pages):
            if k > 0:
                w = new_page()
            w.text(_paragraph(rng, spec.language, 4), 10.5)
            if subs and k < len(subs):
                sub = f"{number}.{k + 1} {subs[k]}"
                w.text(sub, 13, bold=True, gap=8)
                toc.append([2, sub, doc.page_count])
                w.text(_paragraph(rng, spec.language, 3), 10.5)
            if k == 0 and section.bullets:
                items = "\n".join(f"- {_sentence(rng, spec.language)}" for _ in range(4))
                w.text(items, 10.5)
            if k == 0 and section.table:
                table_no += 1
                rows = [["Region", "Q1", "Q2", "Q3", "Q4"]] + [
                    [f"Region {chr(65 + r)}"] + [f"{rng.randint(10, 999)}.{rng.randint(0, 9)}" for _ in range(4)]
                    for r in range(5)
                ]
                w.table(rows, f"Table {table_no}: Quarterly revenue by region (million USD)")
            if k == 1 and section.figure:
                figure_no += 1
                w.figure(f"Figure {figure_no}: Growth of the measured value per quarter", seed=spec.seed + k)
            _fill(w, rng, spec.language)

    for page_no in spec.image_only_pages:
        _replace_with_picture(doc, page_no - 1)
    doc.set_metadata({"title": spec.title})
    if spec.toc:
        doc.set_toc(toc)
    return _save(doc, path)


def _replace_with_picture(doc, index: int, dpi: int = 150) -> None:
    """Swap a page for a scan-like picture of itself: same look, no text layer."""
    page = doc[index]
    rect = page.rect
    pix = page.get_pixmap(dpi=dpi)
    doc.delete_page(index)
    new = doc.new_page(index, width=rect.width, height=rect.height)
    new.insert_image(new.rect, pixmap=pix)


def write_image_only_pdf(path: str, pages: int = 1, seed: int = 3) -> str:
    """A 'scanned' document: every page is a picture, there is no text layer at all."""
    spec = ReportSpec(
        title="Scanned Memo",
        sections=[SectionSpec("Summary", max(0, pages - 1))] if pages > 1 else [],
        image_only_pages=tuple(range(1, pages + 1)),
        seed=seed,
        toc=False,
    )
    return write_report_pdf(path, spec)


def write_page_sizes_pdf(path: str, sizes: Iterable[tuple[float, float]]) -> str:
    """One page per (width, height) in points, with a line of text: for token-count checks."""
    pymupdf = import_pymupdf()
    doc = pymupdf.open()
    for width, height in sizes:
        page = doc.new_page(width=width, height=height)
        page.insert_text((min(10, width / 4), min(30, height / 2)), "size", fontsize=min(11, height / 4))
    return _save(doc, path)


def write_dense_pdf(path: str, chars: int = 40_000, lines: int = 4_000, pages: int = 2) -> str:
    """A 'plot' page: tens of thousands of tiny characters and thousands of vector strokes.

    The kind of page that makes unbounded table detection run for minutes; the pool must bound it.
    """
    pymupdf = import_pymupdf()
    doc = pymupdf.open()
    rng = random.Random(7)
    for p in range(pages):
        page = doc.new_page(width=LETTER[0], height=LETTER[1])
        if p == 0:
            shape = page.new_shape()
            for _ in range(lines):
                x, y = rng.uniform(40, 570), rng.uniform(40, 750)
                shape.draw_line((x, y), (x + rng.uniform(-20, 20), y + rng.uniform(-20, 20)))
            shape.finish(color=(0, 0, 0), width=0.3)
            shape.commit()
            per_line = 170
            text = "".join(rng.choice("0123456789.,-ABCDEFxy ") for _ in range(chars))
            rows = [text[i:i + per_line] for i in range(0, len(text), per_line)]
            y = 20.0
            for row in rows:
                page.insert_text((20, y), row, fontsize=3)
                y += 3.1
                if y > 780:
                    y = 22.0  # overprint: only the amount of text matters
        else:
            page.insert_text((72, 100), "Appendix: the data behind the plot.", fontsize=11)
    return _save(doc, path)


def write_encrypted_pdf(path: str, seed: int = 5) -> str:
    """A document that needs a user password to open."""
    pymupdf = import_pymupdf()
    tmp = path + ".plain"
    write_report_pdf(tmp, ReportSpec(title="Confidential", sections=[SectionSpec("Secret", 1)], seed=seed))
    doc = pymupdf.open(tmp)
    os.remove(tmp)
    return _save(doc, path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user-secret", owner_pw="owner-secret")


def write_truncated_pdf(path: str, keep: float = 0.45, seed: int = 6) -> str:
    """A valid report cut short (an interrupted download): the xref and most objects are gone."""
    tmp = path + ".full"
    write_report_pdf(tmp, ReportSpec(title="Truncated", seed=seed))
    with open(tmp, "rb") as f:
        data = f.read()
    os.remove(tmp)
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


def write_not_a_pdf(path: str) -> str:
    """Bytes that are not a PDF at all, under a .pdf name."""
    with open(path, "wb") as f:
        f.write(b"<html><body>404 Not Found</body></html>\n" * 20)
    return path


def write_zero_page_pdf(path: str) -> str:
    """A syntactically valid PDF whose page tree is empty (PyMuPDF refuses to save one)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [] /Count 0 >>",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    with open(path, "wb") as f:
        f.write(bytes(out))
    return path


@dataclass
class SampleSet:
    """Paths of a generated sample set, with the outcome each one should get."""

    good: dict[str, str]  # name -> path
    bad: dict[str, tuple[str, str]]  # name -> (path, expected rejection reason)


def write_sample_set(folder: str, copies_for_dedup: bool = True) -> SampleSet:
    """The quickstart's and tests' "small set of PDFs": three reports (en, de, zh), a scan with an
    image-only page, and one file of every broken kind (plus a byte-identical copy for dedup)."""
    os.makedirs(folder, exist_ok=True)
    j = lambda name: os.path.join(folder, name)  # noqa: E731
    good = {
        "report_en": write_report_pdf(j("report_en.pdf"), ReportSpec(seed=1)),
        "report_de": write_report_pdf(j("bericht_de.pdf"), ReportSpec(
            title="Technischer Bericht", language="de", seed=2, page_size=A4,
            header="Muster GmbH - Interner Bericht",
            sections=[SectionSpec("Einleitung", 2), SectionSpec("Methoden", 3, table=True),
                      SectionSpec("Ergebnisse", 3, figure=True)])),
        "report_zh": write_report_pdf(j("report_zh.pdf"), ReportSpec(
            title="技术报告", language="zh", seed=4, header="内部报告",
            sections=[SectionSpec("引言", 3), SectionSpec("方法", 3), SectionSpec("结论", 3)])),
        "scan": write_report_pdf(j("scanned_page.pdf"), ReportSpec(
            title="Report With A Scanned Page", seed=8, image_only_pages=(3,),
            sections=[SectionSpec("Overview", 2), SectionSpec("Appendix", 2)])),
    }
    bad = {
        "encrypted": (write_encrypted_pdf(j("encrypted.pdf")), "encrypted"),
        "truncated": (write_truncated_pdf(j("truncated.pdf")), "corrupt"),
        "not_a_pdf": (write_not_a_pdf(j("not_a_pdf.pdf")), "corrupt"),
        "zero_pages": (write_zero_page_pdf(j("zero_pages.pdf")), "too_few_pages"),
    }
    if copies_for_dedup:
        with open(good["report_en"], "rb") as f:
            data = f.read()
        copy = j("report_en_copy.pdf")  # sorts after the original, so it is the one dropped
        with open(copy, "wb") as f:
            f.write(data)
        bad["duplicate"] = (copy, "duplicate")
    return SampleSet(good=good, bad=bad)


__all__ = [
    "A4",
    "HUGE",
    "LETTER",
    "SLIDE_16_9",
    "TINY",
    "ReportSpec",
    "SampleSet",
    "SectionSpec",
    "write_dense_pdf",
    "write_encrypted_pdf",
    "write_image_only_pdf",
    "write_not_a_pdf",
    "write_page_sizes_pdf",
    "write_report_pdf",
    "write_sample_set",
    "write_truncated_pdf",
    "write_zero_page_pdf",
]


CORPUS_SECTIONS = ("Introduction", "Background", "Data Sources", "Methods", "Experiments", "Results",
                   "Cost Analysis", "Risks", "Discussion", "Outlook")


def write_corpus(folder: str, count: int, seed: int = 0) -> list[str]:
    """``count`` English reports of 12-30 pages with different sections, tables and numbers: a
    small document pool for the quickstart (deterministic for ``seed``)."""
    import random

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        names = rng.sample(CORPUS_SECTIONS, rng.randint(4, 7))
        sections = [SectionSpec(name, rng.randint(2, 4), table=rng.random() < 0.6, figure=rng.random() < 0.3,
                                bullets=rng.random() < 0.3) for name in names]
        spec = ReportSpec(title=f"Project Report {seed * 1000 + i}", sections=sections, seed=seed * 1000 + i)
        paths.append(write_report_pdf(os.path.join(folder, f"report_{seed:03d}_{i:03d}.pdf"), spec))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m megatron_vlm.pool.synthetic_pdfs",
                                     description="Write the generated sample PDFs (good and deliberately broken).")
    parser.add_argument("out_dir")
    parser.add_argument("--corpus", type=int, default=0, metavar="N",
                        help="write N generated reports (12-30 pages) instead of the test sample set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.corpus:
        paths = write_corpus(args.out_dir, args.corpus, args.seed)
        print(f"wrote {len(paths)} reports to {args.out_dir}")
        return 0
    sample = write_sample_set(args.out_dir)
    for name, path in sample.good.items():
        print(f"good  {name:10s} {path}")
    for name, (path, reason) in sample.bad.items():
        print(f"bad   {name:10s} {path}  (expected: {reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
