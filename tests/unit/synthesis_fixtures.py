"""Fixtures of the synthesis tests: a generated PDF whose every fact the test knows (headings,
paragraph text, key-value lines, captions, tables with awkward numbers and a total row), and a
pool built from it with the real pool stage."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional

# PyMuPDF only through the pool's importer: with its ONNX layout add-on loaded, find_tables splits
# decimal points out of numbers ("449.7" -> "4497 ."), and the pool built in this process would differ.
from megatron_vlm.pool.pdf import import_pymupdf

WORDS = ("amber basil cedar delta ember fjord garnet harbor island juniper kettle lantern meadow nectar "
         "orchard pepper quarry raven saffron timber umber valley willow yarrow zephyr anchor beacon canyon "
         "dune estuary falcon glacier heron inlet jasper kelp lagoon marble nimbus opal pebble").split()

TABLES = {
    "output": (["Region", "Q1", "Q2", "Q3"], [
        ["North", "1,234.5", "880.25", "77"],
        ["South", "998.0", "1,020.75", "81"],
        ["East", "450.5", "300.00", "93"],
        ["West", "1,500.0", "12.5", "60"],
        ["Total", "4,183.0", "2,213.50", "311"],
    ]),
    "prices": (["Product", "2021", "2022"], [
        ["Alpha", "$45.20", "$50.10"],
        ["Beta", "$12.00", "$9.95"],
        ["Gamma", "$7.50", "$7.50"],
        ["Delta", "$101.25", "$98.00"],
    ]),
    "sites": (["Site", "Share", "Staff", "Note"], [
        ["Oslo", "12.5%", "42", "coastal"],
        ["Bergen", "7%", "-3", "rainy"],
        ["Trondheim", "30.25%", "1,200", "north"],
        ["Stavanger", "9.75%", "18", "oil"],
    ]),
}

KV_LINES = ["Project lead: Dana Whitfield", "Budget code: 7731", "Review date: 12 March 2021",
            "Contract value: $2,450.75"]


@dataclass
class PageTruth:
    headings: list[str] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    kv: dict[str, str] = field(default_factory=dict)
    table: Optional[tuple[list[str], list[list[str]]]] = None


@dataclass
class DocTruth:
    path: str
    num_pages: int
    pages: dict[int, PageTruth]
    title: str

    def cell(self, page: int, row: str, column: str) -> str:
        table = self.pages[page].table
        assert table is not None, f"no table on page {page}"
        header, rows = table
        (match,) = [r for r in rows if r[0] == row]
        return match[header.index(column)]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
    return " ".join(words).capitalize() + "."


class _Writer:
    def __init__(self, page):
        self.page, self.y = page, 80.0
        self.left, self.right, self.bottom = 72.0, page.rect.width - 72.0, page.rect.height - 72.0

    def text(self, text: str, size: float = 10.5, bold: bool = False, gap: float = 8.0) -> bool:
        rect = (self.left, self.y, self.right, self.bottom)
        left = self.page.insert_textbox(rect, text, fontsize=size, fontname="hebo" if bold else "helv",
                                        lineheight=1.25)
        if left < 0:
            return False
        self.y = self.bottom - left + gap
        return True

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        all_rows = [header] + rows
        col_w, row_h, top = (self.right - self.left) / len(header), 18.0, self.y
        shape = self.page.new_shape()
        for r, row in enumerate(all_rows):
            for c, cell in enumerate(row):
                x0, y0 = self.left + c * col_w, top + r * row_h
                shape.draw_rect((x0, y0, x0 + col_w, y0 + row_h))
                self.page.insert_text((x0 + 4, y0 + 13), cell, fontsize=9.5, fontname="hebo" if r == 0 else "helv")
        shape.finish(color=(0, 0, 0), width=0.6)
        shape.commit()
        self.y = top + len(all_rows) * row_h + 12

    def figure(self, seed: int) -> None:
        pymupdf = import_pymupdf()

        rng = random.Random(seed)
        width, height = 120, 60
        samples = bytearray()
        bars = [rng.randint(5, height - 5) for _ in range(6)]
        for y in range(height):
            for x in range(width):
                samples += bytes((30, 80, 150) if (height - y) < bars[x * 6 // width] else (250, 250, 250))
        pix = pymupdf.Pixmap(pymupdf.csRGB, width, height, bytes(samples), False)
        self.page.insert_image((self.left + 80, self.y, self.right - 80, self.y + 120), pixmap=pix)
        self.y += 128


# (title, pages, {page offset: things to put there})
SECTIONS = [
    ("Overview", 3, {1: ["kv"]}),
    ("Regional Output", 3, {0: ["table:output"], 1: ["figure"]}),
    ("Product Prices", 3, {0: ["table:prices"], 2: ["figure"]}),
    ("Site Statistics", 3, {0: ["table:sites"]}),
    ("Methods", 2, {1: ["subsection:Sampling Plan"]}),
    ("Conclusions", 3, {}),
]


def write_facts_pdf(path: str, seed: int = 0, title: str = "Coastal Facts Report") -> DocTruth:
    """An 18-page report (title page + 6 sections, outline, running header/footer) with known facts."""
    pymupdf = import_pymupdf()

    rng = random.Random(seed)
    doc = pymupdf.open()
    total = 1 + sum(s[1] for s in SECTIONS)
    truth: dict[int, PageTruth] = {}
    toc = [[1, title, 1]]
    table_no = figure_no = 0

    def new_page() -> _Writer:
        page = doc.new_page(width=612, height=792)
        number = doc.page_count
        page.insert_text((72, 40), f"{title} - internal", fontsize=8.5, fontname="helv")
        page.insert_text((280, 760), f"Page {number} of {total}", fontsize=8.5, fontname="helv")
        truth[number] = PageTruth()
        return _Writer(page)

    w = new_page()
    w.y = 150
    w.text(title, 24, bold=True, gap=20)
    para = " ".join(_sentence(rng) for _ in range(4))
    w.text(para)
    truth[1].paragraphs.append(para)
    for number, (name, pages, extras) in enumerate(SECTIONS, start=1):
        for k in range(pages):
            w = new_page()
            here = truth[doc.page_count]
            if k == 0:
                heading = f"{number} {name}"
                w.text(heading, 16, bold=True, gap=10)
                here.headings.append(heading)
                toc.append([1, heading, doc.page_count])
            for item in extras.get(k, []):
                if item == "kv":
                    w.text("\n".join(KV_LINES))
                    here.kv = dict(line.split(": ", 1) for line in KV_LINES)
                elif item.startswith("table:"):
                    table_no += 1
                    header, rows = TABLES[item.split(":", 1)[1]]
                    caption = f"Table {table_no}: {name} by category"
                    w.text(caption, 10, gap=4)
                    here.captions.append(caption)
                    w.table(header, rows)
                    here.table = (header, rows)
                elif item == "figure":
                    figure_no += 1
                    w.figure(seed * 10 + figure_no)
                    caption = f"Figure {figure_no}: Trend of the {name.lower()} index"
                    w.text(caption, 10)
                    here.captions.append(caption)
                elif item.startswith("subsection:"):
                    para = " ".join(_sentence(rng) for _ in range(3))
                    w.text(para)
                    here.paragraphs.append(para)
                    sub = f"{number}.1 {item.split(':', 1)[1]}"
                    w.text(sub, 13, bold=True)
                    here.headings.append(sub)
                    toc.append([2, sub, doc.page_count])
            for _ in range(3):
                para = " ".join(_sentence(rng) for _ in range(rng.randint(3, 4)))
                if not w.text(para):
                    break
                here.paragraphs.append(para)
    doc.set_metadata({"title": title, "producer": "test", "creator": "test", "creationDate": "D:20240101000000Z",
                      "modDate": "D:20240101000000Z"})
    doc.set_toc(toc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc.save(path, garbage=3, deflate=True, no_new_id=True)
    doc.close()
    return DocTruth(path=path, num_pages=total, pages=truth, title=title)


def build_pool(inputs: list[str], output: str) -> str:
    """A merged pool of ``inputs`` built in-process by the real pool stage."""
    from megatron_vlm.pool.build import PoolConfig, merge_pool, run_shard

    # one spawned worker: a fresh interpreter, whatever this process has imported (see import_pymupdf above)
    cfg = PoolConfig(output=output, min_pages=1, workers=1, progress=False)
    run_shard(inputs, cfg, log=lambda msg: None)
    merge_pool(output, 1)
    return output
