"""A teacher without a model: QA pairs read off the pool's text layer and tables, correct by
construction, so the synthesis pipeline (and its tests and the quickstart) runs without a server.
It is the fallback; the recipe's teacher is an OpenAI-compatible model (teachers.OpenAITeacher).

It sees only the segment's pages, like a model teacher, and only their body text: blocks labelled
header/footer, blocks inside the top or bottom 7% of the page (running heads, page numbers) and
page labels ("12", "xiv", "117 / 233") are never read. Every answer is checked against the page's
text as PyMuPDF renders it from the PDF (the pool's block text when the PDF is gone): a heading,
caption or paragraph must be whole lines there, a cell or value whole words, else the fact is not
used. Facts (text-layer pages only: OCR text may be wrong):

- sections: outline entries whose heading is printed on their page, with the body blocks up to the
  next heading of the same or a higher level (complete when both ends lie in the segment);
- tables, addressed by their caption ("Table 7.2: ...") and section when they have one, else by
  page; complete (counted, summed, listed whole) only when captioned and neither continued from the
  page before nor on the next;
- section headings, captions of figures and tables, "Key: value" lines (key unique where asked).

Questions name a section (or a table's caption) wherever they can, so the model has to find the
content; pages are named where nothing else anchors a fact. Per task: extract-single asks for one
fact (a table cell, a caption, a section's opening paragraph or value line, the page a section or
table starts on); extract-multi lists several (a section's subsections or table captions, a table's
entries, cells across tables); reasoning computes over table cells (totals over a whole column,
largest entry, row counts, differences and comparisons across two pages' tables) in exact decimal
arithmetic, or counts a section's subsections or tables, falling back to the page gap between two
headings. Every pair carries a ``derivation`` naming its ``kind`` and the cells/lines it used, so
its answer can be audited (the tests recompute every one); :data:`KINDS` lists the kinds per task.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Optional, Sequence

from megatron_vlm.pool.records import DocRecord, load_blocks
from megatron_vlm.pool.sections import FRONT_MATTER, join_lines
from megatron_vlm.synthesis.teachers import QAPair, TeacherRequest, TeacherResult, Usage

OFFLINE_MODEL = "offline-facts/v2"
MAX_CELL_CHARS = 60
MAX_TEXT_ANSWER_CHARS = 200
MIN_PARAGRAPH_WORDS = 6
MARGIN_BAND = 0.07  # top/bottom share of the page height where running heads and page numbers sit
RUNNING_BAND = 0.15  # a text repeated on >= 3 pages inside this band is a running head/footer too
MAX_LISTED = 10  # longest list answer (subsections, table entries)

_NUMBER = re.compile(r"^(?P<neg>[-\u2212])?(?P<cur>[$€£¥])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
                     r"(?P<pct>%)?$")
_KV = re.compile(r"^([A-Z][^:\n]{1,40}):\s+(\S[^\n]{0,100})$")
_TOTAL = re.compile(r"\b(total|sum|overall|all|average|mean|gesamt|summe)\b|合计|总计|總計", re.IGNORECASE)
_CAPTION_KIND = re.compile(r"^\s*(fig\.?|figure|table|chart|abbildung|tabelle|图|表)\s*\d", re.IGNORECASE)
_PAGE_LABEL = re.compile(r"^\s*(?:(?:page|seite|p\.)\s*)?(?:\d+|[ivxlcdm]+)(?:\s*(?:/|of|von)\s*\d+)?\s*$",
                         re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:(?:chapter|section|part|appendix|kapitel|abschnitt|anhang)\s+)?"
                        r"(?:[0-9]+|[ivxlc]+|[a-z])(?:\.[0-9]+)*[.):]?\s+", re.IGNORECASE)
_MARGIN_LABELS = frozenset({"header", "footer", "page_number", "page-number", "pagenumber"})
_NOT_PROSE = re.compile(r"^(?:tip|note|caution|warning|important|hinweis|achtung|warnung)\b|^[$#>]|^\.\.\.|"
                        r"[{}<>|\\]|\s{3,}", re.IGNORECASE)


def _key(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def _title_key(text: str) -> str:
    """A heading's key without its numbering ("7.3 GUI infrastructure" -> "guiinfrastructure")."""
    return _key(_NUMBERING.sub("", text, count=1)) or _key(text)


def _clean(text: str) -> str:
    return " ".join(join_lines(text).split())


# ------------------------------------------------------------------------------------ numbers


@dataclass(frozen=True)
class Num:
    """A printed number: exact value, decimals shown, and its unit (currency sign or %)."""

    value: Decimal
    decimals: int
    unit: str  # "" | "%" | "$" | "€" | ...

    def render(self, value: Optional[Decimal] = None, decimals: Optional[int] = None) -> str:
        v = self.value if value is None else value
        d = self.decimals if decimals is None else decimals
        text = f"{abs(v):.{d}f}"
        sign = "-" if v < 0 else ""
        if self.unit == "%":
            return f"{sign}{text}%"
        return f"{sign}{self.unit}{text}"


def parse_number(text: str) -> Optional[Num]:
    """A number as printed in a table cell ("1,234.5", "$45.20", "98.5%", "-3"), else None."""
    m = _NUMBER.match(text.strip())
    if not m:
        return None
    digits = m.group("int").replace(",", "") + ("." + m.group("frac") if m.group("frac") else "")
    value = Decimal(digits)
    if m.group("neg"):
        value = -value
    unit = "%" if m.group("pct") else (m.group("cur") or "")
    if m.group("pct") and m.group("cur"):
        return None
    return Num(value, len(m.group("frac") or ""), unit)


def answer_for(num: Num, value: Decimal, decimals: int) -> tuple[Any, str]:
    """(answer, answer_format) of a computed number: Integer without unit and decimals, else Float."""
    if decimals == 0 and num.unit == "":
        return int(value), "Integer"
    return num.render(value, decimals), "Float"


def cell_answer(text: str) -> tuple[Any, str]:
    """(answer, answer_format) for a value copied from the page."""
    num = parse_number(text)
    if num is None:
        return text, "String"
    if num.decimals == 0 and num.unit == "":
        return int(num.value), "Integer"
    return text, "Float"


# ------------------------------------------------------------------------------ rendered text


class Rendered:
    """A page's text as rendered: its lines in order (the check that an answer is whole lines or
    whole words of the page, never a line cut short or a word cut off)."""

    def __init__(self, lines: Sequence[str]):
        self.line_keys = [k for k in (_key(line) for line in lines) if k]
        self.words = " " + " ".join(k for line in lines for k in (_key(w) for w in line.split()) if k) + " "

    def has_lines(self, text: str) -> bool:
        """``text`` is one line or a run of consecutive whole lines (compared without spaces and punctuation)."""
        target = _key(text)
        if not target:
            return False
        for i, first in enumerate(self.line_keys):
            if not target.startswith(first):
                continue
            joined = first
            for nxt in self.line_keys[i + 1:]:
                if len(joined) >= len(target):
                    break
                joined += nxt
            if joined == target:
                return True
        return False

    def has_words(self, text: str) -> bool:
        """``text`` is a run of whole words of the page."""
        keys = [k for k in (_key(w) for w in text.split()) if k]
        return bool(keys) and (" " + " ".join(keys) + " ") in self.words


def rendered_pages(source: str, pages: Sequence[int]) -> Optional[dict[int, Rendered]]:
    """The lines PyMuPDF renders on ``pages`` of the PDF at ``source`` (None: it cannot be read)."""
    try:
        from megatron_vlm.pool.pdf import import_pymupdf

        pymupdf = import_pymupdf()
        doc = pymupdf.open(source)
    except Exception:  # noqa: BLE001 - moved, unreadable or no PyMuPDF: the pool's blocks stand in
        return None
    out = {}
    try:
        for page in pages:
            if not 1 <= page <= doc.page_count:
                return None
            lines = []
            for block in doc[page - 1].get_text("dict").get("blocks", []):
                for line in block.get("lines", []):
                    text = "".join(span.get("text", "") for span in line.get("spans", []))
                    if text.strip():
                        lines.append(text)
            out[page] = Rendered(lines)
    except Exception:  # noqa: BLE001
        return None
    finally:
        doc.close()
    return out


def _running_key(text: str) -> str:
    return re.sub(r"\d+", "#", " ".join(text.split()).casefold())


def _in_band(block: dict, height: Optional[float], band: float) -> bool:
    bbox = block.get("bbox")
    if not height or not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return bbox[3] <= band * height or bbox[1] >= (1 - band) * height


def running_texts(pages: Sequence[dict], heights: dict, min_pages: int = 3) -> frozenset:
    """Texts (numbers masked) in the outer 15% of at least ``min_pages`` pages: running heads and
    footers a little lower than the margin band ("Debian Reference 117 / 233" -> "debian reference # / #")."""
    count: Counter = Counter()
    for page in pages:
        height = heights.get(int(page.get("page", 0)))
        count.update({_running_key(str(b.get("text", ""))) for b in page.get("blocks") or []
                      if b.get("label") != "table" and str(b.get("text", "")).strip()
                      and _in_band(b, height, RUNNING_BAND)})
    return frozenset(k for k, n in count.items() if n >= min_pages)


def body_blocks(page_record: dict, height: Optional[float], running: frozenset = frozenset()) -> list[dict]:
    """The page's blocks without running heads, footers and page numbers (by label, by position in
    the top/bottom margin band, by repetition near the top or bottom of pages, and by form)."""
    out = []
    for block in page_record.get("blocks") or []:
        if block.get("label") in _MARGIN_LABELS:
            continue
        text = str(block.get("text", ""))
        if not text.strip() or _PAGE_LABEL.match(text):
            continue
        if _in_band(block, height, MARGIN_BAND):
            continue
        if running and _in_band(block, height, RUNNING_BAND) and _running_key(text) in running:
            continue
        out.append(block)
    return out


# ------------------------------------------------------------------------------------- facts


@dataclass
class Table:
    page: int
    label_header: str
    columns: list[str]  # headers of the value columns
    rows: list[str]  # row labels
    cells: list[list[str]]  # [row][column] printed text
    caption: str = ""  # its "Table N: ..." caption when one sits right before or after it
    section: str = ""  # outline title of the section it lies in ("" = none known)
    complete: bool = False  # captioned, and neither continued from the page before nor onto the next
    bad_rows: set = field(default_factory=set)  # rows whose label is not whole words of the rendered page
    bad_cells: set = field(default_factory=set)  # (row, column) not whole words of the rendered page

    def numeric_column(self, c: int, rows: Sequence[int]) -> Optional[list[Num]]:
        if any((r, c) in self.bad_cells for r in rows):
            return None
        nums = [parse_number(self.cells[r][c]) for r in rows]
        if any(n is None for n in nums) or len({n.unit for n in nums}) != 1:  # type: ignore[union-attr]
            return None
        return nums  # type: ignore[return-value]

    def good_rows(self) -> list[int]:
        return [r for r in range(len(self.rows)) if r not in self.bad_rows]

    def plain_rows(self) -> list[int]:
        """Rows that are not totals/averages (those would double-count in a sum or win every max)."""
        return [r for r in self.good_rows() if not _TOTAL.search(self.rows[r])]

    def total_rows(self) -> list[int]:
        return [r for r in range(len(self.rows)) if _TOTAL.search(self.rows[r])]

    def cell_ok(self, r: int, c: int) -> bool:
        text = self.cells[r][c]
        return (r not in self.bad_rows and (r, c) not in self.bad_cells and bool(text)
                and len(text) <= MAX_CELL_CHARS)


@dataclass
class PageFacts:
    page: int
    tables: list[Table] = field(default_factory=list)
    table_blocks: int = 0
    headings: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    kv: dict[str, str] = field(default_factory=dict)  # key -> value, keys unique on the page


def _is_header(text: str) -> bool:
    num = parse_number(text)
    return bool(text) and (num is None or (num.unit == "" and num.decimals == 0 and 1800 <= num.value <= 2200))


def _split_punctuation(cell: str) -> bool:
    tokens = cell.split()
    return len(tokens) > 1 and any(all(not ch.isalnum() for ch in tok) for tok in tokens)


def parse_table(page: int, rows: Any) -> Optional[Table]:
    """A table usable for questions, or None: rectangular, >= 2 data rows and >= 1 value column,
    non-empty unique headers and row labels of short single-line text (other cells may be long or
    empty: questions only use short, non-empty ones)."""
    if not isinstance(rows, list) or len(rows) < 3:
        return None
    grid = []
    for row in rows:
        if not isinstance(row, list) or any(not isinstance(c, str) for c in row):
            return None
        grid.append([re.sub(r"(?<=[^\W\d_])- (?=[^\W\d_])", "-", " ".join(c.split())) for c in row])
    width = len(grid[0])
    if width < 2 or any(len(r) != width for r in grid):
        return None
    header, body = grid[0], grid[1:]
    labels = [r[0] for r in body]
    if not all(_is_header(h) for h in header[1:]) or len({_key(h) for h in header[1:]}) != width - 1:
        return None
    if any(len(h) > MAX_CELL_CHARS for h in header):
        return None
    if any(not label or parse_number(label) is not None for label in labels):
        return None
    if len({_key(label) for label in labels}) != len(labels) or any(not _key(label) for label in labels):
        return None
    if any(len(x) > MAX_CELL_CHARS for x in labels):
        return None
    if any(_split_punctuation(c) for r in grid for c in r if len(c) <= MAX_CELL_CHARS):
        return None  # text extraction scattered a cell ("4497 ." for "449.7"): its text is not what is printed
    return Table(page=page, label_header=header[0], columns=header[1:], rows=labels, cells=[r[1:] for r in body])


def _caption_kind(text: str) -> str:
    """"table" | "figure" for a "Table N ..."/"Figure N ..." caption, else ""."""
    m = _CAPTION_KIND.match(text)
    if not m:
        return ""
    return "table" if m.group(1).lower() in ("table", "tabelle", "表") else "figure"


def _whole_caption(block: dict, rendered: Optional[Rendered]) -> str:
    """A caption block's text when it is a whole, short "Table/Figure N" caption as rendered, else ""."""
    raw = str(block.get("text", ""))
    text = _clean(raw)
    if block.get("label") != "caption" or len(raw.strip().splitlines()) > 3 or not _caption_kind(text):
        return ""  # a long caption block may have swallowed the text after it
    if len(text) > MAX_TEXT_ANSWER_CHARS or text.endswith(("-", ",", ";", ":", "(")):
        return ""
    if rendered is not None and not rendered.has_lines(text):
        return ""
    return text


def _check_table(table: Table, rendered: Optional[Rendered]) -> None:
    if rendered is None:
        return
    for r, label in enumerate(table.rows):
        if not rendered.has_words(label):
            table.bad_rows.add(r)  # e.g. a label the cell box cut off ("gnome-remote-des" for "...-desktop")
        for c, text in enumerate(table.cells[r]):
            if text and len(text) <= MAX_CELL_CHARS and not rendered.has_words(text):
                table.bad_cells.add((r, c))
    if not all(rendered.has_words(h) for h in [table.label_header] + table.columns if h):
        table.bad_rows.update(range(len(table.rows)))  # a header we cannot name: no question on it


def page_facts(page_record: dict, toc_titles: Optional[list[str]], height: Optional[float] = None,
               rendered: Optional[Rendered] = None, running: frozenset = frozenset()) -> PageFacts:
    """Facts of one page from its block record (``toc_titles``: outline headings starting on it;
    ``height``: the page image's height, for the margin band; ``rendered``: the PDF's lines;
    ``running``: the document's :func:`running_texts`)."""
    facts = PageFacts(page=int(page_record["page"]))
    if page_record.get("source") != "text":
        return facts
    blocks = body_blocks(page_record, height, running)
    tables = [i for i, b in enumerate(blocks) if b.get("label") == "table"]
    facts.table_blocks = len(tables)
    for i in tables:
        table = parse_table(facts.page, blocks[i].get("rows"))
        if table is None:
            continue
        _check_table(table, rendered)
        # its caption: the block right after it, else right before it (one caption, one table)
        for j in (i + 1, i - 1):
            if 0 <= j < len(blocks) and _caption_kind(_clean(str(blocks[j].get("text", "")))) == "table":
                table.caption = _whole_caption(blocks[j], rendered)
                break
        # complete: something else of the page before it and after it, so it neither runs on from
        # the page before nor onto the next (a table's first or last block on a page may be a part)
        table.complete = bool(table.caption) and 0 < i < len(blocks) - 1
        if len(tables) == 1 or table.caption:
            facts.tables.append(table)  # several tables on a page: only captioned ones can be named
    headings = [_clean(b.get("text", "")) for b in blocks if b.get("label") == "section"]
    if len(headings) == 1 and 3 <= len(headings[0]) <= 120 and (rendered is None or rendered.has_lines(headings[0])):
        if toc_titles is None or (len(toc_titles) == 1 and _key(toc_titles[0]) == _key(headings[0])):
            facts.headings = headings
    facts.captions = [_whole_caption(b, rendered) for b in blocks if b.get("label") == "caption"]
    kv_lines: dict[str, list[str]] = {}
    for block in blocks:
        if block.get("label") not in ("paragraph", "list"):
            continue
        lines = [line.strip() for line in str(block.get("text", "")).splitlines() if line.strip()]
        for i, line in enumerate(lines):
            m = _KV.match(line)
            if not m or len(m.group(1).split()) > 5:
                continue
            # the value must end on its line: the block ends or the next line is another "Key: value"
            ends_here = i + 1 == len(lines) or _KV.match(lines[i + 1]) is not None
            whole = rendered is None or rendered.has_lines(line)
            if not ends_here or not whole or m.group(2).rstrip().endswith((",", ";", ":", "-", "(")):
                key = _key(m.group(1))
                kv_lines.setdefault(key, []).append("")  # mark the key unusable (but still counted)
                continue
            kv_lines.setdefault(_key(m.group(1)), []).append(line)
    page_text = _key(" ".join(str(b.get("text", "")) for b in blocks))
    for key, lines in kv_lines.items():
        if len(lines) == 1 and lines[0] and key and page_text.count(key) == 1:
            m = _KV.match(lines[0])
            assert m is not None
            value = m.group(2).strip()
            if len(value) <= MAX_TEXT_ANSWER_CHARS:
                facts.kv[m.group(1).strip()] = value
    return facts


# ----------------------------------------------------------------------------------- sections


@dataclass
class SectionSpan:
    """An outline section found in the text: its printed heading and the body blocks up to the next
    heading of the same or a higher level."""

    title: str  # the outline title (what the question quotes: the synthesis checks it as the anchor)
    level: int
    first_page: int  # page of the printed heading
    last_page: int  # page of its last block
    complete: bool  # its end is known (the next same-or-higher heading was found, or the document ends)
    blocks: list[tuple[int, dict]] = field(default_factory=list)  # (page, block) after the heading
    children: list[str] = field(default_factory=list)  # printed headings of its direct subsections
    children_pages: list[int] = field(default_factory=list)
    children_known: bool = True  # every direct subsection of the outline was found printed


def _anchor_words(title: str) -> int:
    return len(" ".join(re.findall(r"\w+", title.casefold())))


def section_spans(record: DocRecord, stream: Sequence[tuple[int, dict]]) -> list[SectionSpan]:
    """Outline sections matched to heading blocks of ``stream`` (the document's body blocks in order)."""
    if record.section_source == "pages":
        return []
    sections = [s for s in record.sections if s.title and s.title != FRONT_MATTER]
    found: list[Optional[int]] = []
    pos = 0
    for section in sections:
        key, hit = _title_key(section.title), None
        for j in range(pos, len(stream)):
            page, block = stream[j]
            if page > section.first_page:
                break
            if (page == section.first_page and block.get("label") in ("section", "title")
                    and _title_key(_clean(str(block.get("text", "")))) == key):
                hit = j
                break
        found.append(hit)
        if hit is not None:
            pos = hit + 1
    spans = []
    for i, section in enumerate(sections):
        start = found[i]
        if start is None:
            continue
        end, complete = len(stream), True
        for k in range(i + 1, len(sections)):
            if sections[k].level <= section.level:
                end = found[k] if found[k] is not None else len(stream)
                complete = found[k] is not None
                break
        body = list(stream[start + 1:end])
        span = SectionSpan(section.title, section.level, stream[start][0], body[-1][0] if body else stream[start][0],
                           complete)
        span.blocks = body
        for k in range(i + 1, len(sections)):
            if sections[k].level <= section.level:
                break
            if sections[k].level == section.level + 1:
                if found[k] is None:
                    span.children_known = False
                else:
                    page, block = stream[found[k]]  # type: ignore[index]
                    span.children.append(_clean(str(block.get("text", ""))))
                    span.children_pages.append(page)
        spans.append(span)
    return spans


# --------------------------------------------------------------------------- question makers


@dataclass
class _Ctx:
    first: int
    last: int
    pages: dict[int, PageFacts]
    heading_counts: Counter  # heading key -> occurrences in the whole document
    rng: random.Random
    spans: list[SectionSpan] = field(default_factory=list)  # sections whose heading lies in the segment
    rendered: Optional[dict[int, Rendered]] = None  # None: the PDF could not be read (block text stands in)
    title_counts: Counter = field(default_factory=Counter)  # outline title key -> occurrences

    def with_tables(self) -> list[Table]:
        """Tables a question can name: by caption and section, or as the only table of its page."""
        return [t for p in sorted(self.pages) for t in self.pages[p].tables
                if (t.caption and t.section) or self.pages[p].table_blocks == 1]

    def anchorable(self) -> list[SectionSpan]:
        """Sections a question can name: unique title of >= 4 word characters, heading in the segment."""
        return [s for s in self.spans if _anchor_words(s.title) >= 4 and self.title_counts[_title_key(s.title)] == 1
                and self.heading_counts[_title_key(s.title)] <= 1]

    def inside(self, span: SectionSpan) -> bool:
        return span.complete and self.first <= span.first_page and span.last_page <= self.last

    def complete_spans(self) -> list[SectionSpan]:
        return [s for s in self.anchorable() if self.inside(s)]

    def rendered_lines(self, page: int, text: str) -> bool:
        return self.rendered is None or page not in self.rendered or self.rendered[page].has_lines(text)


def _q(text: str) -> str:
    return "\u201c" + text + "\u201d"


def _tref(table: Table) -> str:
    """How a question names a table: by caption and section when it has them, else by page."""
    if table.caption and table.section:
        return f"the table {_q(table.caption)} in the section {_q(table.section)}"
    return f"the table on Page {table.page}"


def _pages_phrase(pages: Sequence[int]) -> str:
    if len(pages) == 1:
        return f"Page {pages[0]}"
    if len(pages) == 2:
        return f"Pages {pages[0]} and {pages[1]}"
    return "Pages " + ", ".join(str(p) for p in pages[:-1]) + f", and {pages[-1]}"


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + (" and " if len(items) == 2 else ", and ") + items[-1]


def _cell_item(table: Table, r: int, c: int) -> dict:
    return {"page": table.page, "row": table.rows[r], "column": table.columns[c], "text": table.cells[r][c],
            "caption": table.caption}


def _pick_cell(ctx: _Ctx, table: Table) -> Optional[tuple[int, int]]:
    options = [(r, c) for r in table.good_rows() for c in range(len(table.columns)) if table.cell_ok(r, c)]
    return ctx.rng.choice(options) if options else None


def cell_lookup(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    picked = _pick_cell(ctx, table)
    if picked is None:
        return None
    r, c = picked
    answer, fmt = cell_answer(table.cells[r][c])
    question = (f"In {_tref(table)}, what value is listed for {_q(table.rows[r])} under the column "
                f"{_q(table.columns[c])}?")
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: the table row {table.rows[r]!r}, column {table.columns[c]!r} reads "
                  f"{table.cells[r][c]!r}.", {"op": "cell", "cells": [_cell_item(table, r, c)]})


def heading_single(ctx: _Ctx, page: int) -> QAPair:
    text = ctx.pages[page].headings[0]
    return QAPair(f"What section heading is printed on Page {page}?", text, "String", [page], ["Layout"],
                  f"Page {page} carries one section heading, {text!r}.", {"op": "heading", "items": [
                      {"page": page, "text": text}]})


def _caption_kinds(facts: PageFacts) -> dict[str, str]:
    """kind ("figure" | "table") -> caption, for kinds with exactly one caption on the page."""
    by_kind: dict[str, list[str]] = {}
    for caption in facts.captions:
        kind = _caption_kind(caption) if caption else ""
        if not kind or len(caption) > MAX_TEXT_ANSWER_CHARS:
            return {}  # a caption we cannot read safely: "the figure on Page N" might mean it
        by_kind.setdefault(kind, []).append(caption)
    return {k: v[0] for k, v in by_kind.items() if len(v) == 1}


def caption_single(ctx: _Ctx, page: int) -> Optional[QAPair]:
    kinds = _caption_kinds(ctx.pages[page])
    if not kinds:
        return None
    kind = ctx.rng.choice(sorted(kinds))
    text = kinds[kind]
    return QAPair(f"What is the full caption of the {kind} on Page {page}?", text, "String", [page], ["Layout"],
                  f"Page {page} has one {kind} caption: {text!r}.",
                  {"op": "caption", "items": [{"page": page, "kind": kind, "text": text}]})


def kv_single(ctx: _Ctx, page: int) -> Optional[QAPair]:
    kv = ctx.pages[page].kv
    if not kv:
        return None
    key = ctx.rng.choice(sorted(kv))
    answer, fmt = cell_answer(kv[key])
    return QAPair(f"On Page {page}, what is given after {_q(key + ':')}?", answer, fmt, [page], ["Text"],
                  f"Page {page} has the line {key!r}: {kv[key]!r}.",
                  {"op": "key_value", "items": [{"page": page, "key": key, "text": kv[key]}]})


# ---- found by section (no page named)


def _span_text(span: SectionSpan) -> str:
    return " ".join(str(b.get("text", "")) for _, b in span.blocks)


def _prose(text: str) -> bool:
    words = text.split()
    return (len(words) >= MIN_PARAGRAPH_WORDS and len(text) <= MAX_TEXT_ANSWER_CHARS and text[:1].isupper()
            and text.endswith((".", "!", "?")) and not _NOT_PROSE.search(text))


def section_opening(ctx: _Ctx) -> Optional[QAPair]:
    """The paragraph right under a section's heading, quoted whole."""
    options = []
    for span in ctx.anchorable():
        if not span.blocks:
            continue
        page, block = span.blocks[0]
        text = _clean(str(block.get("text", "")))
        if (block.get("label") == "paragraph" and page <= ctx.last and _prose(text)
                and ctx.rendered_lines(page, text) and page in ctx.pages):
            options.append((span, page, text))
    if not options:
        return None
    span, page, text = ctx.rng.choice(options)
    question = f"Quote in full the paragraph that opens the section {_q(span.title)}, right under its heading."
    return QAPair(question, text, "String", [page], ["Text"],
                  f"Page {page}: the section {span.title!r} opens with {text!r}.",
                  {"op": "section_text", "section": span.title, "items": [{"page": page, "text": text}]})


def section_value(ctx: _Ctx) -> Optional[QAPair]:
    """A "Key: value" line whose key occurs once in the section."""
    options = []
    for span in ctx.anchorable():
        text_key = _key(_span_text(span))
        for page in sorted({p for p, _ in span.blocks}):
            if page not in ctx.pages:
                continue
            for key, value in ctx.pages[page].kv.items():
                if text_key.count(_key(key)) == 1:
                    options.append((span, page, key, value))
    if not options:
        return None
    span, page, key, value = ctx.rng.choice(options)
    answer, fmt = cell_answer(value)
    return QAPair(f"In the section {_q(span.title)}, what is given after {_q(key + ':')}?", answer, fmt, [page],
                  ["Text"], f"Page {page}, section {span.title!r}: the line {key}: {value}",
                  {"op": "key_value", "section": span.title, "items": [{"page": page, "key": key, "text": value}]})


def _span_captions(ctx: _Ctx, span: SectionSpan, kind: str) -> Optional[list[tuple[int, str]]]:
    """(page, caption) of every ``kind`` caption in a complete section (None: one cannot be read whole)."""
    out = []
    for page, block in span.blocks:
        if block.get("label") != "caption":
            continue
        text = _clean(str(block.get("text", "")))
        if _caption_kind(text) != kind:
            continue
        caption = _whole_caption(block, ctx.rendered.get(page) if ctx.rendered else None)
        if not caption:
            return None
        out.append((page, caption))
    # every caption found: numbered without gaps ("Table 1.3", "Table 1.4", ...), and no "Table N" line
    # that the layout labelled as other text (it would be a caption missed by the count)
    numbers = [re.match(r"^\D*([\d.]*\d)", c) for _, c in out]
    if any(m is None for m in numbers):
        return None
    last = [int(m.group(1).split(".")[-1]) for m in numbers]  # type: ignore[union-attr]
    if any(b != a + 1 for a, b in zip(last, last[1:])):
        return None
    if any(b.get("label") != "caption" and _caption_kind(_clean(str(b.get("text", "")))) == kind
           for _, b in span.blocks):
        return None
    return out


def section_caption(ctx: _Ctx) -> Optional[QAPair]:
    options = []
    for span in ctx.complete_spans():
        for kind in ("table", "figure"):
            found = _span_captions(ctx, span, kind)
            if found is not None and len(found) == 1:
                options.append((span, kind, found[0]))
    if not options:
        return None
    span, kind, (page, caption) = ctx.rng.choice(options)
    return QAPair(f"What is the full caption of the only {kind} in the section {_q(span.title)}?", caption, "String",
                  [page], ["Layout"], f"Page {page}: the section {span.title!r} has one {kind}, {caption!r}.",
                  {"op": "caption", "section": span.title, "items": [{"page": page, "kind": kind, "text": caption}]})


def locate_section(ctx: _Ctx) -> Optional[QAPair]:
    """Where a section starts: the page (image) number of its heading."""
    options = [s for s in ctx.anchorable() if s.first_page in ctx.pages]
    if not options:
        return None
    span = ctx.rng.choice(options)
    return QAPair(f"On which page does the section {_q(span.title)} begin?", span.first_page, "Integer",
                  [span.first_page], ["Layout"], f"The heading {span.title!r} is printed on Page {span.first_page}.",
                  {"op": "locate", "section": span.title, "items": [{"page": span.first_page, "text": span.title}]})


def locate_table(ctx: _Ctx) -> Optional[QAPair]:
    tables = [t for t in ctx.with_tables() if t.caption and t.section]
    if not tables:
        return None
    table = ctx.rng.choice(tables)
    return QAPair(f"On which page is the table {_q(table.caption)} of the section {_q(table.section)}?", table.page,
                  "Integer", [table.page], ["Table"], f"The table {table.caption!r} is on Page {table.page}.",
                  {"op": "locate", "section": table.section, "items": [{"page": table.page, "text": table.caption}]})


def subsections(ctx: _Ctx) -> Optional[QAPair]:
    options = [s for s in ctx.complete_spans() if s.children_known and 2 <= len(s.children) <= MAX_LISTED
               and all(ctx.rendered_lines(p, c) for p, c in zip(s.children_pages, s.children))]
    if not options:
        return None
    span = ctx.rng.choice(options)
    question = f"List the headings of the subsections of the section {_q(span.title)}, in order."
    return QAPair(question, list(span.children), "List", sorted(set(span.children_pages)), ["Layout"],
                  "; ".join(f"Page {p}: {c!r}" for p, c in zip(span.children_pages, span.children)),
                  {"op": "subsections", "section": span.title,
                   "items": [{"page": p, "text": c} for p, c in zip(span.children_pages, span.children)]})


def section_captions(ctx: _Ctx) -> Optional[QAPair]:
    options = []
    for span in ctx.complete_spans():
        found = _span_captions(ctx, span, "table")
        if found is not None and 2 <= len(found) <= MAX_LISTED:
            options.append((span, found))
    if not options:
        return None
    span, found = ctx.rng.choice(options)
    return QAPair(f"List the captions of the tables in the section {_q(span.title)}, in order.",
                  [c for _, c in found], "List", sorted({p for p, _ in found}), ["Layout"],
                  "; ".join(f"Page {p}: {c!r}" for p, c in found),
                  {"op": "caption", "section": span.title,
                   "items": [{"page": p, "kind": "table", "text": c} for p, c in found]})


def _complete_tables(ctx: _Ctx) -> list[Table]:
    return [t for t in ctx.with_tables() if t.complete and t.section and not t.bad_rows]


def table_entries(ctx: _Ctx) -> Optional[QAPair]:
    """Every row label of a whole table (the first column), in order."""
    tables = [t for t in _complete_tables(ctx) if 2 <= len(t.rows) <= MAX_LISTED]
    if not tables:
        return None
    table = ctx.rng.choice(tables)
    question = f"List every entry of the first column ({_q(table.label_header)}) of {_tref(table)}, in order."
    return QAPair(question, list(table.rows), "List", [table.page], ["Table"],
                  f"Page {table.page}: " + ", ".join(table.rows),
                  {"op": "entries", "section": table.section, "caption": table.caption, "page": table.page,
                   "rows": list(table.rows)})


def _segment_span_for(ctx: _Ctx, page: int, block: dict) -> str:
    """The innermost anchorable section holding ``block`` of ``page`` ("" = none)."""
    best, level = "", -1
    for span in ctx.anchorable():
        if any(p == page and b is block for p, b in span.blocks) and span.level > level:
            best, level = span.title, span.level
    return best


# ---- extract-multi


def _multi_pages(ctx: _Ctx, pages: list[int]) -> list[int]:
    k = min(len(pages), ctx.rng.choice((2, 2, 3)))
    return sorted(ctx.rng.sample(pages, k))


def headings_multi(ctx: _Ctx) -> Optional[QAPair]:
    pages = [p for p in sorted(ctx.pages) if ctx.pages[p].headings]
    if len(pages) < 2:
        return None
    chosen = _multi_pages(ctx, pages)
    texts = [ctx.pages[p].headings[0] for p in chosen]
    question = f"What section headings are printed on {_pages_phrase(chosen)}? List them in page order."
    described = "; ".join(f"Page {p}: {t!r}" for p, t in zip(chosen, texts))
    return QAPair(question, texts, "List", chosen, ["Layout"], described,
                  {"op": "heading", "items": [{"page": p, "text": t} for p, t in zip(chosen, texts)]})


def captions_multi(ctx: _Ctx) -> Optional[QAPair]:
    for kind in ctx.rng.sample(["figure", "table"], 2):
        pages = [p for p in sorted(ctx.pages) if kind in _caption_kinds(ctx.pages[p])]
        if len(pages) < 2:
            continue
        chosen = _multi_pages(ctx, pages)
        texts = [_caption_kinds(ctx.pages[p])[kind] for p in chosen]
        question = f"What are the captions of the {kind}s on {_pages_phrase(chosen)}? List them in page order."
        return QAPair(question, texts, "List", chosen, ["Layout"],
                      "; ".join(f"Page {p}: {t!r}" for p, t in zip(chosen, texts)),
                      {"op": "caption", "items": [{"page": p, "kind": kind, "text": t} for p, t in zip(chosen, texts)]})
    return None


def cells_multi(ctx: _Ctx) -> Optional[QAPair]:
    tables = [t for t in ctx.with_tables() if _pick_cell(ctx, t) is not None]
    if len(tables) < 2:
        return None
    chosen = sorted(ctx.rng.sample(tables, min(len(tables), ctx.rng.choice((2, 3)))), key=lambda t: t.page)
    items, parts = [], []
    for table in chosen:
        r, c = _pick_cell(ctx, table)  # type: ignore[misc]
        items.append(_cell_item(table, r, c))
        parts.append(f"the {_q(table.columns[c])} value of {_q(table.rows[r])} in {_tref(table)}")
    question = f"List {_join(parts)}, in that order."
    return QAPair(question, [i["text"] for i in items], "List", sorted({t.page for t in chosen}), ["Table"],
                  "; ".join(f"Page {i['page']}: {i['row']!r}/{i['column']!r} = {i['text']!r}" for i in items),
                  {"op": "cell", "cells": items})


def row_values(ctx: _Ctx) -> Optional[QAPair]:
    """Fallback of extract-multi (one page): several values of one table row."""
    options = []
    for table in ctx.with_tables():
        for r in table.good_rows():
            cols = [c for c in range(len(table.columns)) if table.cell_ok(r, c)]
            if len(cols) >= 2:
                options.append((table, r, cols))
    if not options:
        return None
    table, r, cols = ctx.rng.choice(options)
    cols = sorted(ctx.rng.sample(cols, min(len(cols), ctx.rng.randint(2, 4))))
    names = [_q(table.columns[c]) for c in cols]
    question = f"In {_tref(table)}, what are the values of {_q(table.rows[r])} under {_join(names)}, in that order?"
    items = [_cell_item(table, r, c) for c in cols]
    return QAPair(question, [i["text"] for i in items], "List", [table.page], ["Table"],
                  f"Page {table.page}: row {table.rows[r]!r} gives " + ", ".join(i["text"] for i in items),
                  {"op": "cell", "cells": items})


# ---- reasoning


def _numeric_columns(table: Table, rows: Sequence[int]) -> list[int]:
    return [c for c in range(len(table.columns)) if table.numeric_column(c, rows) is not None]


def _numeric_rows_and_column(ctx: _Ctx, table: Table, min_rows: int,
                             whole_table: bool = False) -> Optional[tuple[list[int], int]]:
    """The table's plain rows and one numeric column drawn at random, or None when it has fewer than
    ``min_rows`` rows or no numeric column. ``whole_table``: only tables read whole (complete, in a
    named section, no unreadable row), for questions over every row."""
    if whole_table and (not table.complete or not table.section or table.bad_rows):
        return None
    rows = table.plain_rows()
    cols = _numeric_columns(table, rows)
    if len(rows) < min_rows or not cols:
        return None
    return rows, ctx.rng.choice(cols)


def _sum_answer(table: Table, rows: Sequence[int], c: int):
    """(answer, answer format) of the sum of column ``c`` over ``rows``, at the cells' own precision."""
    nums = [parse_number(table.cells[r][c]) for r in rows]
    decimals = max(n.decimals for n in nums)  # type: ignore[union-attr]
    return answer_for(nums[0], sum((n.value for n in nums), Decimal(0)), decimals)  # type: ignore


def _unique_extreme(ctx: _Ctx, table: Table, rows: Sequence[int], c: int) -> Optional[tuple[int, bool]]:
    """(row, largest?) of the one row holding the largest or smallest (drawn at random) value of
    column ``c`` among ``rows``; None on a tie."""
    values = {r: parse_number(table.cells[r][c]).value for r in rows}  # type: ignore[union-attr]
    largest = ctx.rng.random() < 0.5
    best = max(values.values()) if largest else min(values.values())
    winners = [r for r, v in values.items() if v == best]
    return (winners[0], largest) if len(winners) == 1 else None


def table_difference(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    found = _numeric_rows_and_column(ctx, table, 2)
    if found is None:
        return None
    rows, c = found
    r1, r2 = ctx.rng.sample(rows, 2)
    a, b = parse_number(table.cells[r1][c]), parse_number(table.cells[r2][c])
    assert a is not None and b is not None
    decimals = max(a.decimals, b.decimals)
    answer, fmt = answer_for(a, a.value - b.value, decimals)
    question = (f"In {_tref(table)}, what is the {_q(table.columns[c])} value of {_q(table.rows[r1])} minus "
                f"that of {_q(table.rows[r2])}?")
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: {table.cells[r1][c]} - {table.cells[r2][c]} = {answer}",
                  {"op": "difference", "cells": [_cell_item(table, r1, c), _cell_item(table, r2, c)]})


def table_sum(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    found = _numeric_rows_and_column(ctx, table, 2)
    if found is None:
        return None
    rows, c = found
    chosen = sorted(ctx.rng.sample(rows, min(len(rows), ctx.rng.randint(2, 4))))
    answer, fmt = _sum_answer(table, chosen, c)
    names = _join([_q(table.rows[r]) for r in chosen])
    question = f"In {_tref(table)}, what is the sum of the {_q(table.columns[c])} values of {names}?"
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: " + " + ".join(table.cells[r][c] for r in chosen) + f" = {answer}",
                  {"op": "sum", "cells": [_cell_item(table, r, c) for r in chosen]})


def table_column_total(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    """The sum of a numeric column over every row of a whole table (total rows left out, and named)."""
    found = _numeric_rows_and_column(ctx, table, 2, whole_table=True)
    if found is None:
        return None
    rows, c = found
    answer, fmt = _sum_answer(table, rows, c)
    totals = table.total_rows()
    but = f", leaving out the row {_join([_q(table.rows[r]) for r in totals])}" if totals else ""
    question = f"What is the sum of all {_q(table.columns[c])} values in {_tref(table)}{but}?"
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: " + " + ".join(table.cells[r][c] for r in rows) + f" = {answer}",
                  {"op": "sum", "whole_column": True, "cells": [_cell_item(table, r, c) for r in rows]})


def table_column_extreme(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    """Which row of a whole table has the largest/smallest value of a column."""
    found = _numeric_rows_and_column(ctx, table, 3, whole_table=True)
    if found is None:
        return None
    rows, c = found
    extreme = _unique_extreme(ctx, table, rows, c)
    if extreme is None:
        return None
    winner, largest = extreme
    word = "largest" if largest else "smallest"
    question = (f"In {_tref(table)}, which {_q(table.label_header)} entry has the {word} {_q(table.columns[c])} "
                f"value?")
    return QAPair(question, table.rows[winner], "String", [table.page], ["Table"],
                  f"Page {table.page}: " + ", ".join(f"{table.rows[r]} {table.cells[r][c]}" for r in rows),
                  {"op": "argmax" if largest else "argmin", "whole_column": True,
                   "cells": [_cell_item(table, r, c) for r in rows]})


def table_extreme(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    found = _numeric_rows_and_column(ctx, table, 3)
    if found is None:
        return None
    rows, c = found
    chosen = sorted(ctx.rng.sample(rows, min(len(rows), ctx.rng.randint(3, 5))))
    extreme = _unique_extreme(ctx, table, chosen, c)
    if extreme is None:
        return None
    winner, largest = extreme
    word = "largest" if largest else "smallest"
    names = _join([_q(table.rows[r]) for r in chosen])
    question = f"In {_tref(table)}, which of {names} has the {word} {_q(table.columns[c])} value?"
    return QAPair(question, table.rows[winner], "String", [table.page], ["Table"],
                  f"Page {table.page}: " + ", ".join(f"{table.rows[r]} {table.cells[r][c]}" for r in chosen),
                  {"op": "argmax" if largest else "argmin", "cells": [_cell_item(table, r, c) for r in chosen]})


def table_count(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    found = _numeric_rows_and_column(ctx, table, 3)
    if found is None:
        return None
    rows, c = found
    if len(rows) > 8:  # name the rows in the question: keep it readable
        rows = sorted(ctx.rng.sample(rows, 6))
    values = {r: parse_number(table.cells[r][c]).value for r in rows}  # type: ignore[union-attr]
    below_max = [r for r in rows if values[r] < max(values.values())]  # a count of 0 teaches little
    pivot = ctx.rng.choice(below_max or rows)
    threshold = parse_number(table.cells[pivot][c])
    assert threshold is not None
    count = sum(1 for r in rows if values[r] > threshold.value)
    names = _join([_q(table.rows[r]) for r in rows])
    question = (f"In {_tref(table)}, how many of {names} have a {_q(table.columns[c])} value greater than "
                f"{table.cells[pivot][c]}?")
    return QAPair(question, count, "Integer", [table.page], ["Table"],
                  f"Page {table.page}: values " + ", ".join(table.cells[r][c] for r in rows) +
                  f"; {count} exceed {table.cells[pivot][c]}.",
                  {"op": "count_greater", "threshold": table.cells[pivot][c],
                   "cells": [_cell_item(table, r, c) for r in rows]})


def table_row_count(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    """How many entries a whole table lists."""
    if not table.complete or not table.section or table.bad_rows or len(table.rows) < 3:
        return None
    question = f"How many rows of entries (not counting the header row) does {_tref(table)} have?"
    return QAPair(question, len(table.rows), "Integer", [table.page], ["Table"],
                  f"Page {table.page}: rows " + ", ".join(table.rows),
                  {"op": "row_count", "section": table.section, "caption": table.caption, "page": table.page,
                   "rows": list(table.rows)})


def cross_page_arithmetic(ctx: _Ctx) -> Optional[QAPair]:
    for _ in range(4):  # a draw may pick values of different units; try a few
        pair = _cross_page_once(ctx)
        if pair is not None:
            return pair
    return None


def _cross_page_once(ctx: _Ctx) -> Optional[QAPair]:
    tables = [t for t in ctx.with_tables() if t.plain_rows()]
    pages = sorted({t.page for t in tables})
    if len(pages) < 2:
        return None
    p1, p2 = sorted(ctx.rng.sample(pages, 2))
    t1 = ctx.rng.choice([t for t in tables if t.page == p1])
    t2 = ctx.rng.choice([t for t in tables if t.page == p2])
    picks = []
    for table in (t1, t2):
        options = [(r, c) for r in table.plain_rows() for c in range(len(table.columns))
                   if table.cell_ok(r, c) and parse_number(table.cells[r][c]) is not None]
        if not options:
            return None
        picks.append(ctx.rng.choice(options))
    a, b = parse_number(t1.cells[picks[0][0]][picks[0][1]]), parse_number(t2.cells[picks[1][0]][picks[1][1]])
    assert a is not None and b is not None
    if a.unit != b.unit:
        return None
    decimals = max(a.decimals, b.decimals)
    items = [_cell_item(t1, *picks[0]), _cell_item(t2, *picks[1])]
    parts = [f"the {_q(i['column'])} value of {_q(i['row'])} in {_tref(t)}" for i, t in zip(items, (t1, t2))]
    if ctx.rng.random() < 0.5:
        answer, fmt = answer_for(a, a.value + b.value, decimals)
        question, op = f"What is the sum of {parts[0]} and {parts[1]}?", "sum"
    else:
        answer, fmt = answer_for(a, a.value - b.value, decimals)
        question, op = f"What is {parts[0]} minus {parts[1]}?", "difference"
    return QAPair(question, answer, fmt, [t1.page, t2.page], ["Table"],
                  f"Pages {t1.page} and {t2.page}: {items[0]['text']} and {items[1]['text']} give {answer}.",
                  {"op": op, "cells": items})


def tables_row_difference(ctx: _Ctx) -> Optional[QAPair]:
    """Two whole tables on different pages: how many more entries the longer one lists."""
    tables = [t for t in _complete_tables(ctx) if len(t.rows) >= 2]
    pairs = [(a, b) for i, a in enumerate(tables) for b in tables[i + 1:] if a.page != b.page
             and len(a.rows) != len(b.rows)]
    if not pairs:
        return None
    a, b = ctx.rng.choice(pairs)
    longer, shorter = (a, b) if len(a.rows) > len(b.rows) else (b, a)
    question = (f"How many more rows of entries does {_tref(longer)} have than {_tref(shorter)} "
                f"(header rows not counted)?")
    return QAPair(question, len(longer.rows) - len(shorter.rows), "Integer", sorted({a.page, b.page}), ["Table"],
                  f"Page {longer.page}: {len(longer.rows)} rows; Page {shorter.page}: {len(shorter.rows)} rows.",
                  {"op": "row_difference", "tables": [
                      {"page": t.page, "caption": t.caption, "section": t.section, "rows": list(t.rows)}
                      for t in (longer, shorter)]})


def subsection_count(ctx: _Ctx) -> Optional[QAPair]:
    options = [s for s in ctx.complete_spans() if s.children_known and len(s.children) >= 2]
    if not options:
        return None
    span = ctx.rng.choice(options)
    return QAPair(f"How many subsections does the section {_q(span.title)} have?", len(span.children), "Integer",
                  sorted(set(span.children_pages)), ["Layout"],
                  f"Subsections of {span.title!r}: " + "; ".join(span.children),
                  {"op": "subsection_count", "section": span.title,
                   "items": [{"page": p, "text": c} for p, c in zip(span.children_pages, span.children)]})


def section_table_count(ctx: _Ctx) -> Optional[QAPair]:
    options = []
    for span in ctx.complete_spans():
        found = _span_captions(ctx, span, "table")
        if found is not None and len(found) >= 2:
            options.append((span, found))
    if not options:
        return None
    span, found = ctx.rng.choice(options)
    return QAPair(f"How many tables does the section {_q(span.title)} contain?", len(found), "Integer",
                  sorted({p for p, _ in found}), ["Table"],
                  f"Tables of {span.title!r}: " + "; ".join(c for _, c in found),
                  {"op": "table_count", "section": span.title,
                   "items": [{"page": p, "kind": "table", "text": c} for p, c in found]})


def heading_gap(ctx: _Ctx) -> Optional[QAPair]:
    pages = [p for p in sorted(ctx.pages) if ctx.pages[p].headings
             and ctx.heading_counts[_title_key(ctx.pages[p].headings[0])] == 1]
    if len(pages) < 2:
        return None
    a, b = sorted(ctx.rng.sample(pages, 2))
    ha, hb = ctx.pages[a].headings[0], ctx.pages[b].headings[0]
    question = (f"How many pages after the page with the {_q(ha)} section heading does the {_q(hb)} section "
                f"heading appear?")
    return QAPair(question, b - a, "Integer", [a, b], ["Layout"],
                  f"{ha!r} is on Page {a} and {hb!r} on Page {b}: {b} - {a} = {b - a}.",
                  {"op": "page_gap", "items": [{"page": a, "text": ha}, {"page": b, "text": hb}]})


# ------------------------------------------------------------------------------------- teacher


Maker = Callable[[_Ctx], Optional[QAPair]]


def _per_page(fn: Callable[[_Ctx, int], Optional[QAPair]], usable: Callable[[PageFacts], bool]) -> Maker:
    def make(ctx: _Ctx) -> Optional[QAPair]:
        pages = [p for p in sorted(ctx.pages) if usable(ctx.pages[p])]
        ctx.rng.shuffle(pages)
        for page in pages[:4]:
            pair = fn(ctx, page)
            if pair is not None:
                return pair
        return None
    return make


def _per_table(fn: Callable[[_Ctx, Table], Optional[QAPair]]) -> Maker:
    def make(ctx: _Ctx) -> Optional[QAPair]:
        tables = ctx.with_tables()
        ctx.rng.shuffle(tables)
        for table in tables[:6]:
            for _ in range(3):  # a draw may hit a tie or a non-numeric column; try a few
                pair = fn(ctx, table)
                if pair is not None:
                    return pair
        return None
    return make


# Each tier's kinds are tried in a random order per request (the first that yields wins), so a kind's
# share follows how often its facts exist, not the size of a page. Later tiers only when no earlier one
# yields. "Which word follows these words" questions are gone: they made most pairs on text-only pages
# and asked nothing a reader of the page would.
SINGLE: dict[str, Maker] = {
    "table_cell": _per_table(cell_lookup),
    "caption": _per_page(caption_single, lambda f: bool(f.captions)),
    "key_value": _per_page(kv_single, lambda f: bool(f.kv)),
    "section_opening": section_opening,
    "section_value": section_value,
    "section_caption": section_caption,
    "locate_section": locate_section,
    "locate_table": locate_table,
}
SINGLE_FALLBACK: dict[str, Maker] = {"heading": _per_page(heading_single, lambda f: bool(f.headings))}
MULTI: dict[str, Maker] = {
    "table_cells": cells_multi,
    "captions": captions_multi,
    "subsections": subsections,
    "section_captions": section_captions,
    "table_entries": table_entries,
}
MULTI_FALLBACK: dict[str, Maker] = {"row_values": row_values, "headings": headings_multi}
REASONING: dict[str, Maker] = {
    "difference": _per_table(table_difference),
    "sum": _per_table(table_sum),
    "extreme": _per_table(table_extreme),
    "count": _per_table(table_count),
    "column_total": _per_table(table_column_total),
    "column_extreme": _per_table(table_column_extreme),
    "row_count": _per_table(table_row_count),
    "cross_page": cross_page_arithmetic,
    "row_difference": tables_row_difference,
    "subsection_count": subsection_count,
    "table_count": section_table_count,
}
REASONING_FALLBACK: dict[str, Maker] = {"page_gap": heading_gap}
PLAN: dict[str, tuple[dict[str, Maker], ...]] = {
    "extract-single": (SINGLE, SINGLE_FALLBACK),
    "extract-multi": (MULTI, MULTI_FALLBACK),
    "reasoning": (REASONING, REASONING_FALLBACK),
}
KINDS: dict[str, list[str]] = {task: [k for tier in tiers for k in tier] for task, tiers in PLAN.items()}


class OfflineTeacher:
    """QA pairs from the pool's blocks (see the module docstring); deterministic per request seed."""

    kind = "offline"

    def __init__(self, model: str = OFFLINE_MODEL, cached_documents: int = 16):
        self.model = model
        self.usage = Usage()
        self._blocks: "OrderedDict[str, list[dict]]" = OrderedDict()
        self._rendered: "OrderedDict[str, Optional[dict[int, Rendered]]]" = OrderedDict()  # None: PDF unreadable
        self._cached_documents = cached_documents

    async def aclose(self) -> None:
        return None

    async def generate(self, request: TeacherRequest) -> TeacherResult:
        return self.generate_sync(request)

    def _doc_blocks(self, pool_dir: str, record: DocRecord) -> list[dict]:
        key = f"{pool_dir}\0{record.doc_id}"
        if key in self._blocks:
            self._blocks.move_to_end(key)
        else:
            self._blocks[key] = load_blocks(pool_dir, record)
            while len(self._blocks) > self._cached_documents:
                self._blocks.popitem(last=False)
        return self._blocks[key]

    def _doc_rendered(self, record: DocRecord, pages: Sequence[int]) -> Optional[dict[int, Rendered]]:
        key = f"{record.source}\0{record.sha256}"
        if key in self._rendered:
            self._rendered.move_to_end(key)
        else:
            self._rendered[key] = {}
            while len(self._rendered) > self._cached_documents:
                self._rendered.popitem(last=False)
        cached = self._rendered[key]
        if cached is None:
            return None
        missing = [p for p in pages if p not in cached]
        if missing:
            more = rendered_pages(record.source, missing)
            if more is None:
                self._rendered[key] = None
                return None
            cached.update(more)
        return {p: cached[p] for p in pages}

    def context(self, request: TeacherRequest) -> _Ctx:
        record = request.record
        blocks = self._doc_blocks(request.pool_dir, record)
        by_page = {int(p["page"]): p for p in blocks}
        heights = {p.page: float(p.height) for p in record.pages}
        toc: Optional[dict[int, list[str]]] = None
        if record.section_source == "toc":
            toc = {}
            for section in record.sections:
                toc.setdefault(section.first_page, []).append(section.title)
        segment = [p for p in range(request.first_page, request.last_page + 1) if p in by_page]
        rendered = self._doc_rendered(record, segment)
        running = running_texts(blocks, heights)
        pages = {}
        for page in segment:
            pages[page] = page_facts(by_page[page], None if toc is None else toc.get(page, []), heights.get(page),
                                     None if rendered is None else rendered.get(page), running)
        stream = [(int(p["page"]), b) for p in sorted(blocks, key=lambda p: int(p["page"]))
                  if p.get("source") == "text" for b in body_blocks(p, heights.get(int(p["page"])), running)]
        heading_counts: Counter = Counter(_title_key(_clean(b.get("text", ""))) for _, b in stream
                                          if b.get("label") == "section")
        title_counts: Counter = Counter(_title_key(s.title) for s in record.sections)
        spans = [s for s in section_spans(record, stream) if request.first_page <= s.first_page <= request.last_page]
        ctx = _Ctx(request.first_page, request.last_page, pages, heading_counts, random.Random(request.seed),
                   spans, rendered, title_counts)
        self._place_tables(ctx, by_page, heights, running)
        return ctx

    @staticmethod
    def _place_tables(ctx: _Ctx, by_page: dict, heights: dict, running: frozenset) -> None:
        """Name the section each captioned table lies in (its caption block's innermost section)."""
        for table in [t for p in sorted(ctx.pages) for t in ctx.pages[p].tables]:
            if not table.caption:
                continue
            for block in body_blocks(by_page[table.page], heights.get(table.page), running):
                if block.get("label") == "caption" and _clean(str(block.get("text", ""))) == table.caption:
                    table.section = _segment_span_for(ctx, table.page, block)
                    break

    def generate_sync(self, request: TeacherRequest) -> TeacherResult:
        if request.task not in PLAN:
            return TeacherResult(drop_reason="unsupported_task", detail=f"the offline teacher has no {request.task}")
        self.usage.requests += 1
        ctx = self.context(request)
        for makers in PLAN[request.task]:
            kinds = sorted(makers)
            ctx.rng.shuffle(kinds)
            for kind in kinds:
                pair = makers[kind](ctx)
                if pair is not None:
                    self.usage.replies += 1
                    assert pair.derivation is not None
                    pair.derivation["kind"] = kind
                    pair.derivation["checked_against"] = "pdf" if ctx.rendered is not None else "pool_blocks"
                    return TeacherResult(pair=pair)
        return TeacherResult(drop_reason="no_usable_facts",
                             detail=f"pages {request.first_page}-{request.last_page} hold no fact usable for "
                                    f"{request.task} (text-layer tables, sections, headings, captions, key-value "
                                    f"lines)")


__all__ = [
    "KINDS",
    "OFFLINE_MODEL",
    "Num",
    "OfflineTeacher",
    "PageFacts",
    "Rendered",
    "SectionSpan",
    "Table",
    "answer_for",
    "body_blocks",
    "cell_answer",
    "page_facts",
    "parse_number",
    "parse_table",
    "rendered_pages",
    "running_texts",
    "section_spans",
]
