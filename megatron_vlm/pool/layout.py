"""Label a document's text blocks: title, section, paragraph, list, table, caption, header, footer
(and figure for raster images), from the text layer alone.

The paper parses rendered pages with an OCR expert model; we approximate its labels with the PDF's
own structure, which is exact where it exists and cheap everywhere:

- font statistics over the whole document: the body size is the size most characters have, so a
  heading is "larger or bolder than the body, short, not a sentence";
- the outline (TOC): an outline entry names a heading on a given page, which fixes its level;
- position and repetition across pages: running headers and footers sit in the top/bottom margin
  and repeat (page numbers masked) on many pages;
- PyMuPDF's ruled-table detector: blocks inside a table become one table block with its cells.

Everything here is pure Python over the dataclasses of :mod:`megatron_vlm.pool.pdf`, so it is
fast (linear in blocks) and testable without PDFs.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from megatron_vlm.pool.pdf import PageContent, TableRegion, TextBlock, TocEntry

LAYOUT_METHODS = ("heuristic", "model")
LABELS = ("title", "section", "paragraph", "list", "table", "caption", "header", "footer", "figure")


@dataclass
class Block:
    """One labelled block: what the synthesis stage and OCR-transcription targets read."""

    label: str
    bbox: tuple[float, float, float, float]  # points, page space (origin top-left)
    text: str
    level: Optional[int] = None  # sections: 1 = top level
    rows: Optional[list[list[str]]] = None  # tables: cell text, rows x columns


@dataclass
class LayoutConfig:
    """Thresholds of the heuristics (fractions of the page height or of the body font size)."""

    margin_fraction: float = 0.12  # header/footer zone at the top and bottom of the page
    min_repeats: int = 3  # pages a header/footer text must repeat on (2 for documents <= 4 pages)
    repeat_fraction: float = 0.25  # ... or at least this share of the pages with text
    running_place_fraction: float = 0.5  # top-margin text at one height on this share of pages: a running head
    heading_size_ratio: float = 1.15  # a heading is this much larger than the body ...
    bold_heading_max_chars: int = 120  # ... or bold, at body size, and at most this long
    heading_max_chars: int = 200
    heading_max_lines: int = 3
    title_size_ratio: float = 1.4
    title_pages: int = 2  # the title is looked for on the first pages only
    max_table_rows: int = 300
    max_table_cols: int = 60


@dataclass
class FontStats:
    """Font facts of one document."""

    body_size: float
    heading_sizes: list[float] = field(default_factory=list)  # distinct, largest first


# caption words: English, German, French, Spanish, Italian, Portuguese, Dutch, Russian, Ukrainian,
# Bulgarian/Serbian, Polish, Czech, Chinese, Japanese, Korean
_CAPTION_WORDS = (
    r"fig(?:ure)?|table|tab|tbl|chart|exhibit|listing|plate|diagram|graph|photo|scheme|algorithm|"
    r"abbildung|abb|tabelle|tab|tableau|tabla|cuadro|figura|fig|tabella|tabela|quadro|figuur|tabel|"
    r"рисунок|рис|таблица|табл|таблиця|фигура|фиг|слика|табела|rysunek|rys|tabulka|obrázek|obr|"
    r"图|表|図|그림|표"
)
_CAPTION_NUMBER = r"(?:[0-9]+(?:[.\-][0-9]+)*|[ivxlc]+\b|[a-z]\b|[一二三四五六七八九十]+)"
_CAPTION_HEAD = re.compile(rf"^\s*(?:{_CAPTION_WORDS})\s*\.?\s*{_CAPTION_NUMBER}(?![0-9])", re.IGNORECASE)
# the caption words that name a table (a table's caption anchors a table drawn with rules only)
_TABLE_CAPTION = re.compile(r"^\s*(?:table|tab|tbl|tabelle|tableau|tabla|cuadro|tabella|tabela|tabel|таблица|табл|"
                            r"таблиця|табела|tabulka|表|표)(?![^\W\d_])", re.IGNORECASE)
_CAPTION_SEPARATORS = ":.-–—|：．"


def caption_start(line: str) -> Optional[str]:
    """"Table 2.1: ...", "Рис. 1.1. ...", "図 3 ..." -> what follows the number; None if ``line`` is not a
    caption's start. A separator, the end of the line or a capital must follow the number:
    "Рис. 1.1 показує ..." / "Figure 3 shows ..." is a sentence about the figure, not its caption."""
    match = _CAPTION_HEAD.match(line)
    if match is None:
        return None
    rest = line[match.end():]
    stripped = rest.lstrip()
    if not stripped:
        return ""
    if stripped[0] in _CAPTION_SEPARATORS:
        return stripped[1:].strip()
    if rest[:1].isspace() and (stripped[0].isupper() or not stripped[0].isalpha() or not stripped[0].islower()):
        return stripped
    return None


_BULLET = re.compile(r"^\s*([\u2022\u2023\u25e6\u2043\u2219\u25aa\u25cf\u25a0\u25a1\u2013\u2014\-\*\u00b7\u2192>]"
                     r"|\(?[0-9]{1,2}[.)]|\(?[a-z][.)]|\(?[ivx]{1,4}[.)])\s+\S", re.IGNORECASE)
# a chapter's label alone ("Chapter 3", "Kapitel 3", "Глава 3", "Part II", "第3章"): its title follows
_CHAPTER_ONLY = re.compile(r"^\s*((chapter|kapitel|chapitre|cap[ií]tulo|capitolo|hoofdstuk|rozdzia[lł]|глава|розділ|"
                           r"part|teil|partie|appendix|anhang|annexe|приложение|додаток)\s+([0-9]+|[IVXLC]+|[A-Z])"
                           r"|第\s*[0-9一二三四五六七八九十]+\s*[章部])\s*[.:]?\s*$", re.IGNORECASE)
_NUMBERED_HEADING = re.compile(r"^\s*((chapter|section|part|appendix|kapitel|第)\s+)?"
                               r"([0-9]+(\.[0-9]+)*|[A-Z](\.[0-9]+)*|[IVX]+)\.?\s+\S")
_TOC_LINE = re.compile(r"(\.\s*){4,}\s*\d*$|^\s*[0-9]+(\.[0-9]+)*\.?\s+\D.*\s[0-9ivxlc]{1,4}$", re.IGNORECASE)
_PAGE_NUMBER = re.compile(r"^((page|seite|p\.)\s*)?(#+|[ivxlc]+)(\s*(of|/|von)\s*#+)?$|^-\s*#+\s*-$", re.IGNORECASE)


def _norm(text: str) -> str:
    """Compare-key for text: NFKC, case-folded, digits masked, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\d+", "#", text)
    return " ".join(text.split())


def _norm_heading(text: str) -> str:
    """Compare-key for headings vs outline titles: letters and digits only."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def font_stats(pages: Sequence[PageContent]) -> FontStats:
    """Body size = the font size carrying the most characters in the document."""
    by_size: Counter = Counter()
    for page in pages:
        for block in page.blocks:
            by_size[block.size] += block.num_chars
    if not by_size:
        return FontStats(body_size=0.0)
    body = max(by_size.items(), key=lambda kv: (kv[1], -kv[0]))[0]
    return FontStats(body_size=body)


def _in_margin(block: TextBlock, page: PageContent, cfg: LayoutConfig) -> Optional[str]:
    top_limit = page.height * cfg.margin_fraction
    bottom_limit = page.height * (1.0 - cfg.margin_fraction)
    short = len(block.lines) <= 3 and block.num_chars <= 200
    if not short:
        return None
    # a running head's top is in the zone and its bottom at most a line below it (LaTeX's
    # headings sit lower than DocBook's)
    if block.bbox[3] <= top_limit or (block.bbox[1] < top_limit and block.bbox[3] <= top_limit + 0.04 * page.height
                                      and len(block.lines) == 1):
        return "header"
    if block.bbox[1] >= bottom_limit:
        return "footer"
    return None


def running_blocks(pages: Sequence[PageContent], cfg: LayoutConfig, body_size: float = 0.0) -> set[tuple[int, int]]:
    """(page index, block index) of running headers/footers: margin blocks whose text (page numbers
    masked) repeats on enough pages, margin blocks that are just a page number, and top-margin
    blocks at body size or smaller that sit at the same height on at least half of the pages:
    running heads that name the current chapter or section ("CHAPTER 3. TOOLS 3.3. GIT", "1.5
    Typical session 7") change text from page to page but not place."""
    occurrences: dict[tuple[str, str], set[int]] = defaultdict(set)
    places: dict[tuple[int, float], set[int]] = defaultdict(set)
    candidates: list[tuple[int, int, str, str, Optional[tuple[int, float]]]] = []
    for p, page in enumerate(pages):
        for b, block in enumerate(page.blocks):
            zone = _in_margin(block, page, cfg)
            if zone:
                key = _norm(block.text)
                occurrences[(zone, key)].add(p)
                place = None
                # slides (landscape pages) put their frame titles at one height: those are headings
                if (zone == "header" and len(block.lines) <= 2 and page.height >= page.width
                        and (not body_size or block.size < body_size * cfg.heading_size_ratio)):
                    place = (round(block.bbox[1] / 3), block.size)
                    places[place].add(p)
                candidates.append((p, b, zone, key, place))
    pages_with_text = sum(1 for page in pages if page.blocks)
    needed = 2 if pages_with_text <= 4 else max(2, min(cfg.min_repeats, round(cfg.repeat_fraction * pages_with_text)))
    needed_place = max(2, math.ceil(cfg.running_place_fraction * pages_with_text))
    found = set()
    for p, b, zone, key, place in candidates:
        if (len(occurrences[(zone, key)]) >= needed or _PAGE_NUMBER.match(key)
                or (place is not None and len(places[place]) >= needed_place)):
            found.add((p, b))
    return found


def _merge_split_labels(page: PageContent) -> PageContent:
    """"Table 2:" + "Predefined font sets" (two blocks) -> one caption block, "Chapter 3" +
    "Tool setups" -> one heading block: a block that is only a caption's number (or a chapter's)
    takes the short block right after it when that one is close below or beside."""
    blocks = page.blocks
    if not any(caption_start(b.text) == "" or _CHAPTER_ONLY.match(b.text) for b in blocks):
        return page
    merged: list[TextBlock] = []
    i = 0
    while i < len(blocks):
        block = blocks[i]
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is not None and _CHAPTER_ONLY.match(block.text) and len(nxt.lines) <= 3 and nxt.num_chars <= 150:
            line_height = max(block.bbox[3] - block.bbox[1], 1.0)
            if 0 <= nxt.bbox[1] - block.bbox[3] <= 3 * line_height:
                bbox = (min(block.bbox[0], nxt.bbox[0]), block.bbox[1], max(block.bbox[2], nxt.bbox[2]), nxt.bbox[3])
                merged.append(TextBlock(bbox=bbox, lines=block.lines + nxt.lines, size=max(block.size, nxt.size),
                                        bold=min(block.bold, nxt.bold)))
                i += 2
                continue
        if nxt is not None and caption_start(block.text) == "" and len(nxt.lines) <= 3:
            line_height = max(block.bbox[3] - block.bbox[1], 1.0)
            below = 0 <= nxt.bbox[1] - block.bbox[3] <= 1.5 * line_height
            beside = abs(nxt.bbox[1] - block.bbox[1]) <= 0.5 * line_height and nxt.bbox[0] >= block.bbox[2] - 1
            if below or beside:
                bbox = (min(block.bbox[0], nxt.bbox[0]), min(block.bbox[1], nxt.bbox[1]),
                        max(block.bbox[2], nxt.bbox[2]), max(block.bbox[3], nxt.bbox[3]))
                lines = [block.lines[0] + " " + nxt.lines[0]] + nxt.lines[1:]
                merged.append(TextBlock(bbox=bbox, lines=lines, size=block.size, bold=block.bold))
                i += 2
                continue
        merged.append(block)
        i += 1
    return replace(page, blocks=merged)


def _same_extent(a: tuple[float, float, float], b: tuple[float, float, float], slack: float = 1.0) -> bool:
    return abs(a[0] - b[0]) <= slack and abs(a[2] - b[2]) <= slack


def rule_tables(page: PageContent, skip: set[int]) -> list[tuple[tuple[float, float, float, float], list[int]]]:
    """Tables drawn with horizontal rules only (booktabs' top and bottom rule; LaTeX description
    lists in a table float): a table caption ("Table 1.1: ...", "Табл. 1.1: ...") within three
    lines of a rule anchors the region between that rule and the next one of the same extent, on
    the caption's far side; its text blocks are the table. A region must hold >= 2 blocks, no
    heading or caption, and not start with a one-word line (an admonition box: "Note", "Tip"); the
    nearer side wins. Returns (region, block indices); ``skip``: blocks that cannot belong."""
    rules = [r for r in page.rules if 0.06 * page.height < r[1] < 0.94 * page.height]  # not a running head's rule
    if len(rules) < 2:
        return []
    found: list[tuple[tuple[float, float, float, float], list[int]]] = []
    used: set[int] = set()
    captions = [i for i, block in enumerate(page.blocks)
                if i not in skip and _TABLE_CAPTION.match(block.lines[0]) and caption_start(block.lines[0]) is not None]
    for ci in captions:
        cap = page.blocks[ci]
        line = max((cap.bbox[3] - cap.bbox[1]) / max(len(cap.lines), 1), 4.0)
        best: Optional[tuple[float, tuple[float, float, float, float], list[int]]] = None
        for downward in (True, False):
            near = [r for r in rules if (cap.bbox[3] - 1 <= r[1] <= cap.bbox[3] + 3 * line if downward
                                         else cap.bbox[1] - 3 * line <= r[1] <= cap.bbox[1] + 1)]
            if not near:
                continue
            start = min(near, key=lambda r: r[1]) if downward else max(near, key=lambda r: r[1])
            partners = [r for r in rules if _same_extent(r, start)
                        and (r[1] > start[1] + line if downward else r[1] < start[1] - line)]
            if not partners:
                continue
            end = min(partners, key=lambda r: r[1]) if downward else max(partners, key=lambda r: r[1])
            region = (min(start[0], end[0]) - 2, min(start[1], end[1]), max(start[2], end[2]) + 2, max(start[1], end[1]))
            members = [i for i, block in enumerate(page.blocks)
                       if i not in skip and i != ci and i not in used and _center_inside(block.bbox, region, slack=0.0)]
            if not _table_like(page, members) or any(_overlap(region, t.bbox) for t in page.tables):
                continue
            gap = start[1] - cap.bbox[3] if downward else cap.bbox[1] - start[1]
            if best is None or gap < best[0]:
                best = (gap, region, members)
        if best is not None:
            used.update(best[2])
            found.append((best[1], best[2]))
    return found


def _table_like(page: PageContent, members: list[int]) -> bool:
    if len(members) < 2:
        return False
    blocks = [page.blocks[i] for i in members]
    if len(blocks[0].lines[0].split()) < 2:
        return False  # "Note" / "Tip" over the text of an admonition box
    body = min(block.size for block in blocks)
    return not any(caption_start(block.lines[0]) is not None or block.size > body * 1.15 for block in blocks)


def _overlap(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _rows_from_blocks(blocks: Sequence[TextBlock]) -> list[list[str]]:
    """Rows of a rule-only table: a block whose first line starts at the block's left edge begins a
    row (first word | the rest); other blocks (hanging continuation lines) extend the last row."""
    rows: list[list[str]] = []
    left = min(block.bbox[0] for block in blocks)
    for block in blocks:
        text = " ".join(block.lines)
        if rows and block.bbox[0] > left + 6:
            rows[-1][-1] = (rows[-1][-1] + " " + text).strip()
            continue
        head, _, rest = text.partition(" ")
        rows.append([head, rest])
    return rows


def _center_inside(bbox, region, slack: float = 2.0) -> bool:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return region[0] - slack <= cx <= region[2] + slack and region[1] - slack <= cy <= region[3] + slack


def _is_list(block: TextBlock) -> bool:
    """Bulleted or numbered: most lines start with a marker, or the first one does (one item that
    wraps over several lines: "1. Create the input file ... (5 lines)")."""
    starts = sum(1 for line in block.lines if _BULLET.match(line))
    if starts == 0:
        return False
    return starts * 2 >= len(block.lines) or _BULLET.match(block.lines[0]) is not None


def _is_caption(block: TextBlock) -> bool:
    return block.num_chars <= 400 and caption_start(block.lines[0]) is not None


def _looks_like_heading(block: TextBlock, stats: FontStats, cfg: LayoutConfig, page_width: float = 0.0,
                        page_height: float = 0.0) -> bool:
    """Larger than the body, or bold at body size; short; not a sentence (a slide's frame title may be)."""
    if len(block.lines) > cfg.heading_max_lines or block.num_chars > cfg.heading_max_chars:
        return False
    text = block.text.strip()
    if not text or not (text[0].isalnum() or text[0] in "§("):
        return False
    if sum(ch.isalpha() for ch in text) < 2:  # numbers, formulas, table residue
        return False
    slide = page_width > page_height > 0
    if text.endswith((".", ",", ";")) and not _NUMBERED_HEADING.match(text) and not (slide and block.bold >= 0.5):
        return False
    if _TOC_LINE.search(" ".join(block.lines)):  # a table-of-contents row ("2.1 Overview .... 7"), not a heading
        return False
    body = stats.body_size or block.size
    if block.size >= body * cfg.heading_size_ratio:
        return True
    bold_enough = block.bold >= (0.5 if slide else 0.8)
    return bold_enough and block.size >= body * 0.95 and block.num_chars <= cfg.bold_heading_max_chars


def _is_frame_title(p: int, b: int, block: TextBlock, page: PageContent, running, cfg: LayoutConfig) -> bool:
    """A slide's (landscape page's) frame title: its first block below the running headline, in
    the top fifth, at most three lines, partly bold (beamer sets the section's name, not bold, in
    small type above the bold title in the same block)."""
    if not page.width > page.height > 0 or block.bold < 0.3 or len(block.lines) > cfg.heading_max_lines:
        return False
    if block.bbox[1] > 0.2 * page.height:
        return False
    earlier = [i for i in range(b) if (p, i) not in running and page.blocks[i].bbox[1] <= block.bbox[1]]
    return not earlier


def _numbering_depth(text: str) -> Optional[int]:
    match = re.match(r"^\s*([0-9]+(?:\.[0-9]+)*)\.?\s+\S", text)
    return match.group(1).count(".") + 1 if match else None


def _match_toc(block: TextBlock, entries: Sequence[TocEntry]) -> Optional[TocEntry]:
    """The outline entry (on this page) whose title this block's text is, or starts with."""
    key = _norm_heading(block.text)
    if len(key) < 2:
        return None
    for entry in entries:
        title = _norm_heading(entry.title)
        if len(title) < 2:
            continue
        prefix_of_title = len(key) >= 4 and title.startswith(key)  # a heading cut across blocks
        title_then_more = key.startswith(title) and len(block.lines) <= 2  # "2.1 Overview" + a page number
        if key == title or prefix_of_title or title_then_more:
            return entry
    return None


def label_document(
    pages: Sequence[PageContent],
    toc: Sequence[TocEntry] = (),
    metadata_title: str = "",
    cfg: Optional[LayoutConfig] = None,
    method: str = "heuristic",
    pdf_pages: Optional[Sequence] = None,
) -> list[list[Block]]:
    """Labelled blocks for every page, in reading (content-stream) order, tables and figures placed
    where their first block (or their vertical position) falls.

    ``method``: "heuristic" (the default: text-layer rules below, ~10-20 pages/s with reading) or
    "model" (PyMuPDF's ONNX layout model on ``pdf_pages``, the PyMuPDF page objects; ~1 page/s on
    one CPU core; see tools/bench/layout.py for both on hand-labelled pages).
    """
    if method not in LAYOUT_METHODS:
        raise ValueError(f"unknown layout method {method!r}; expected one of {', '.join(LAYOUT_METHODS)}")
    if method == "model":
        if pdf_pages is None or len(pdf_pages) != len(pages):
            raise ValueError("layout method 'model' needs the PyMuPDF page of every page (pdf_pages)")
        from megatron_vlm.pool.layout_model import model_blocks
        return [model_blocks(page) for page in pdf_pages]
    cfg = cfg or LayoutConfig()
    pages = [_merge_split_labels(page) for page in pages]
    stats = font_stats(pages)
    running = running_blocks(pages, cfg, stats.body_size)
    toc_by_page: dict[int, list[TocEntry]] = defaultdict(list)
    for entry in toc:
        toc_by_page[entry.page].append(entry)

    # heading sizes, for levels of headings the outline does not name
    heading_sizes: set[float] = set()
    for p, page in enumerate(pages):
        for b, block in enumerate(page.blocks):
            if (p, b) not in running and _looks_like_heading(block, stats, cfg) and block.size > stats.body_size:
                heading_sizes.add(block.size)
    stats.heading_sizes = sorted(heading_sizes, reverse=True)
    title_ref = _find_title(pages, stats, running, metadata_title, cfg)

    out: list[list[Block]] = []
    for p, page in enumerate(pages):
        used_toc: set[int] = set()
        labelled: list[Block] = []
        placed: set[int] = set()  # tables already in `labelled` (at their first cell's block)
        page_running = {b for b in range(len(page.blocks)) if (p, b) in running}
        ruled_only = rule_tables(page, page_running)
        member_of = {b: t for t, (_, members) in enumerate(ruled_only) for b in members}
        for b, block in enumerate(page.blocks):
            if b in member_of:
                t = member_of[b]
                if -1 - t not in placed:
                    placed.add(-1 - t)
                    region, members = ruled_only[t]
                    rows = _rows_from_blocks([page.blocks[i] for i in members])
                    bbox = (min(page.blocks[i].bbox[0] for i in members), min(page.blocks[i].bbox[1] for i in members),
                            max(page.blocks[i].bbox[2] for i in members), max(page.blocks[i].bbox[3] for i in members))
                    labelled.append(_table_block(TableRegion(bbox=bbox, rows=rows), cfg))
                continue
            table_index = next((t for t, table in enumerate(page.tables) if _center_inside(block.bbox, table.bbox)),
                               None)
            if table_index is not None and (p, b) not in running:
                if table_index not in placed:
                    placed.add(table_index)
                    labelled.append(_table_block(page.tables[table_index], cfg))
                continue
            labelled.append(_label_block(p, b, block, page, stats, running, title_ref, toc_by_page, used_toc, cfg))
        for t, table in enumerate(page.tables):  # tables whose cells held no separate text block
            if t not in placed:
                _insert_by_y(labelled, _table_block(table, cfg))
        for box in page.images:
            _insert_by_y(labelled, Block(label="figure", bbox=box, text=""))
        out.append(_join_title_blocks(labelled))
    return out


def _join_title_blocks(blocks: list[Block]) -> list[Block]:
    """A title set over two text blocks ("On the Complexity of ... Perfect Phylogeny" + "Model") is
    one title block: consecutive title blocks less than two lines apart are joined."""
    out: list[Block] = []
    for block in blocks:
        prev = out[-1] if out else None
        if (prev is not None and block.label == "title" and prev.label == "title"
                and 0 <= block.bbox[1] - prev.bbox[3] <= 2 * max(block.bbox[3] - block.bbox[1], 1.0)):
            bbox = (min(prev.bbox[0], block.bbox[0]), prev.bbox[1], max(prev.bbox[2], block.bbox[2]), block.bbox[3])
            out[-1] = Block(label="title", bbox=bbox, text=prev.text + "\n" + block.text)
            continue
        out.append(block)
    return out


def _find_title(pages, stats: FontStats, running, metadata_title: str,
                cfg: LayoutConfig) -> Optional[tuple[int, float]]:
    """(page index, font size) of the document title: the block equal to the metadata title if
    any, else the largest text (>= ``title_size_ratio`` x body) on the first pages, topmost first."""
    best: Optional[tuple[bool, float, int, float]] = None  # (named, size, -page, -y): max wins
    meta_key = _norm_heading(metadata_title)
    for p, page in enumerate(pages[: cfg.title_pages]):
        for b, block in enumerate(page.blocks):
            if (p, b) in running or block.num_chars > 300 or sum(ch.isalpha() for ch in block.text) < 2:
                continue
            if _numbering_depth(block.text) is not None or _CHAPTER_ONLY.match(block.lines[0]):
                continue  # "3.3 git", "Chapter 3": a heading inside the document, not its title
            big = bool(stats.body_size) and block.size >= stats.body_size * cfg.title_size_ratio
            named = len(meta_key) >= 4 and _norm_heading(block.text) == meta_key
            if big or named:
                key = (named, block.size, -p, -block.bbox[1])
                if best is None or key > best:
                    best = key
    return None if best is None else (-best[2], best[1])


def _label_block(p, b, block: TextBlock, page: PageContent, stats: FontStats, running, title_ref,
                 toc_by_page, used_toc: set[int], cfg: LayoutConfig) -> Block:
    text = block.text
    if (p, b) in running:
        zone = _in_margin(block, page, cfg) or "header"
        return Block(label=zone, bbox=block.bbox, text=text)
    if (title_ref is not None and p == title_ref[0] and abs(block.size - title_ref[1]) < 0.26 and block.num_chars <= 300
            and _numbering_depth(text) is None and not _CHAPTER_ONLY.match(block.lines[0])):
        return Block(label="title", bbox=block.bbox, text=text)
    if _is_caption(block):
        return Block(label="caption", bbox=block.bbox, text=text)
    if _is_frame_title(p, b, block, page, running, cfg):
        return Block(label="section", bbox=block.bbox, text=text, level=1)
    entries = [e for e in toc_by_page.get(page.number, ()) if id(e) not in used_toc]
    entry = _match_toc(block, entries) if entries and len(block.lines) <= cfg.heading_max_lines else None
    if entry is not None and block.num_chars <= cfg.heading_max_chars:
        used_toc.add(id(entry))
        return Block(label="section", bbox=block.bbox, text=text, level=entry.level)
    heading = _looks_like_heading(block, stats, cfg, page.width, page.height)
    if _is_list(block) and not (heading and (block.bold >= 0.8 or block.size >= stats.body_size * cfg.heading_size_ratio)):
        return Block(label="list", bbox=block.bbox, text=text)
    if heading:
        return Block(label="section", bbox=block.bbox, text=text, level=_heading_level(block, stats))
    return Block(label="paragraph", bbox=block.bbox, text=text)


def _heading_level(block: TextBlock, stats: FontStats) -> int:
    depth = _numbering_depth(block.text)
    if depth is not None:
        return min(depth, 6)
    if block.size in stats.heading_sizes:
        return min(stats.heading_sizes.index(block.size) + 1, 6)
    return min(len(stats.heading_sizes) + 1, 6)  # bold at body size: the deepest level


def _table_block(table, cfg: LayoutConfig) -> Block:
    rows = [row[: cfg.max_table_cols] for row in table.rows[: cfg.max_table_rows]]
    text = "\n".join(" | ".join(cell for cell in row) for row in rows)
    return Block(label="table", bbox=table.bbox, text=text, rows=rows)


def _insert_by_y(blocks: list[Block], new: Block) -> None:
    """Insert before the first non-margin block that starts below ``new``'s top."""
    for i, block in enumerate(blocks):
        if block.label not in ("header", "footer") and block.bbox[1] > new.bbox[1]:
            blocks.insert(i, new)
            return
    index = len(blocks)
    while index > 0 and blocks[index - 1].label == "footer":
        index -= 1
    blocks.insert(index, new)


__all__ = ["LABELS", "LAYOUT_METHODS", "caption_start", "rule_tables", "Block", "FontStats", "LayoutConfig", "font_stats", "label_document", "running_blocks"]
