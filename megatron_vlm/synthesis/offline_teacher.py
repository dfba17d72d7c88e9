"""A teacher without a model: QA pairs read off the pool's text layer and tables, correct by
construction, so the synthesis pipeline (and its tests and the quickstart) runs without a server.

It sees only the segment's pages, like a model teacher. Facts it uses (text-layer pages only: OCR
text may be wrong, so a fact from it could be too):

- table cells, addressed by row label and column header, from tables that are the only table on
  their page and whose header and row labels are unique (so "the table on Page 7", "Region B",
  "Q2" name exactly one cell);
- section headings, from pages with exactly one heading block (agreeing with the outline when the
  document has one);
- captions of figures and tables, from pages with exactly one caption of that kind;
- "Key: value" lines, where the key occurs once on its page;
- the word that follows a five-word phrase occurring exactly once on its page (words broken by a
  line-end hyphen are never used).

Per task: extract-single asks for one fact on one page; extract-multi gathers facts from two or
three pages (falling back to several values of one table row when no cross-page question exists);
reasoning computes over table cells (difference, sum, largest/smallest, count above a printed
value; across two pages' tables too) in exact decimal arithmetic, or counts the pages between two
headings that occur once in the whole document. Every pair carries a ``derivation`` saying which
cells/lines it used and how, so its answer can be audited (the tests recompute every one).
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
from megatron_vlm.pool.sections import join_lines
from megatron_vlm.synthesis.teachers import QAPair, TeacherRequest, TeacherResult, Usage

OFFLINE_MODEL = "offline-facts/v1"
PHRASE_WORDS = 5
MAX_CELL_CHARS = 60
MAX_TEXT_ANSWER_CHARS = 200

_NUMBER = re.compile(r"^(?P<neg>[-\u2212])?(?P<cur>[$€£¥])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
                     r"(?P<pct>%)?$")
_WORD = re.compile(r"^\w+(?:['\u2019-]\w+)*$")
_TRAILING = ".,;:!?)]}\"'\u201d\u2019"
_KV = re.compile(r"^([A-Z][^:\n]{1,40}):\s+(\S[^\n]{0,100})$")
_TOTAL = re.compile(r"\b(total|sum|overall|all|average|mean|gesamt|summe)\b|合计|总计|總計", re.IGNORECASE)
_CAPTION_KIND = re.compile(r"^\s*(fig\.?|figure|table|chart|abbildung|tabelle|图|表)\s*\d", re.IGNORECASE)


def _key(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


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


# ------------------------------------------------------------------------------------- facts


@dataclass
class Table:
    page: int
    label_header: str
    columns: list[str]  # headers of the value columns
    rows: list[str]  # row labels
    cells: list[list[str]]  # [row][column] printed text

    def numeric_column(self, c: int, rows: Sequence[int]) -> Optional[list[Num]]:
        nums = [parse_number(self.cells[r][c]) for r in rows]
        if any(n is None for n in nums) or len({n.unit for n in nums}) != 1:  # type: ignore[union-attr]
            return None
        return nums  # type: ignore[return-value]

    def plain_rows(self) -> list[int]:
        """Rows that are not totals/averages (those would double-count in a sum or win every max)."""
        return [r for r, label in enumerate(self.rows) if not _TOTAL.search(label)]


@dataclass
class PageFacts:
    page: int
    tables: list[Table] = field(default_factory=list)
    table_blocks: int = 0
    headings: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    kv: dict[str, str] = field(default_factory=dict)  # key -> value, keys unique on the page
    words: list[tuple[str, bool]] = field(default_factory=list)  # body (token, usable) in reading order
    blocks_of_words: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per body block
    phrase_counts: Counter = field(default_factory=Counter)  # PHRASE_WORDS-grams of ALL text on the page


def _is_header(text: str) -> bool:
    num = parse_number(text)
    return bool(text) and (num is None or (num.unit == "" and num.decimals == 0 and 1800 <= num.value <= 2200))


def _split_punctuation(cell: str) -> bool:
    tokens = cell.split()
    return len(tokens) > 1 and any(all(not ch.isalnum() for ch in tok) for tok in tokens)


def parse_table(page: int, rows: Any) -> Optional[Table]:
    """A table usable for questions, or None: rectangular, >= 2 data rows and >= 1 value column,
    non-empty unique headers and row labels, short single-line cells."""
    if not isinstance(rows, list) or len(rows) < 3:
        return None
    grid = []
    for row in rows:
        if not isinstance(row, list) or any(not isinstance(c, str) for c in row):
            return None
        grid.append([" ".join(c.split()) for c in row])
    width = len(grid[0])
    if width < 2 or any(len(r) != width for r in grid):
        return None
    header, body = grid[0], grid[1:]
    labels = [r[0] for r in body]
    if not all(_is_header(h) for h in header[1:]) or len({_key(h) for h in header[1:]}) != width - 1:
        return None
    if any(not label or parse_number(label) is not None for label in labels):
        return None
    if len({_key(label) for label in labels}) != len(labels) or any(not _key(label) for label in labels):
        return None
    too_long = any(len(x) > MAX_CELL_CHARS for x in labels)
    if too_long or any(not c or len(c) > MAX_CELL_CHARS for r in grid for c in r[1:]):
        return None
    if any(_split_punctuation(c) for r in grid for c in r):
        return None  # text extraction scattered a cell ("4497 ." for "449.7"): its text is not what is printed
    return Table(page=page, label_header=header[0], columns=header[1:], rows=labels, cells=[r[1:] for r in body])


def _page_words(blocks: Sequence[dict]) -> tuple[list[tuple[str, bool]], list[tuple[int, int]]]:
    """Whitespace tokens of the body text, each marked usable unless next to a line-end hyphen."""
    words: list[tuple[str, bool]] = []
    spans = []
    for block in blocks:
        if block.get("label") not in ("paragraph", "list"):
            continue
        start = len(words)
        broken_next = False
        for line in str(block.get("text", "")).splitlines():
            tokens = line.split()
            for i, tok in enumerate(tokens):
                usable = not broken_next
                broken_next = False
                if i == len(tokens) - 1 and tok.endswith(("-", "\u00ad")):
                    usable = False
                    broken_next = True
                words.append((tok, usable))
        spans.append((start, len(words)))
    return words, spans


def page_facts(page_record: dict, toc_titles: Optional[list[str]]) -> PageFacts:
    """Facts of one page from its block record (``toc_titles``: outline headings starting on it)."""
    facts = PageFacts(page=int(page_record["page"]))
    if page_record.get("source") != "text":
        return facts
    blocks = page_record.get("blocks") or []
    tables = [b for b in blocks if b.get("label") == "table"]
    facts.table_blocks = len(tables)
    if len(tables) == 1:
        table = parse_table(facts.page, tables[0].get("rows"))
        if table is not None:
            facts.tables.append(table)
    headings = [_clean(b.get("text", "")) for b in blocks if b.get("label") == "section"]
    if len(headings) == 1 and 3 <= len(headings[0]) <= 120:
        if toc_titles is None or (len(toc_titles) == 1 and _key(toc_titles[0]) == _key(headings[0])):
            facts.headings = headings
    # a caption block of many lines may have swallowed the text after it: only short ones are used
    facts.captions = [_clean(b.get("text", "")) if len(str(b.get("text", "")).strip().splitlines()) <= 3 else ""
                      for b in blocks if b.get("label") == "caption"]
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
            if not ends_here or m.group(2).rstrip().endswith((",", ";", ":", "-", "(")):
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
    facts.words, facts.blocks_of_words = _page_words(blocks)
    for block in blocks:  # a phrase must be unique among every text on the page, headings and cells too
        keys = [_key(tok) for tok in str(block.get("text", "")).split()]
        keys = [k for k in keys if k]
        facts.phrase_counts.update(tuple(keys[i:i + PHRASE_WORDS]) for i in range(len(keys) - PHRASE_WORDS + 1))
    return facts


# --------------------------------------------------------------------------- question makers


@dataclass
class _Ctx:
    first: int
    last: int
    pages: dict[int, PageFacts]
    heading_counts: Counter  # heading key -> occurrences in the whole document
    rng: random.Random

    def with_tables(self) -> list[Table]:
        return [t for p in sorted(self.pages) for t in self.pages[p].tables]


def _q(text: str) -> str:
    return "\u201c" + text + "\u201d"


def _tref(table: Table) -> str:
    return f"the table on Page {table.page}"


def _pick_cell(ctx: _Ctx, table: Table) -> tuple[int, int]:
    return ctx.rng.randrange(len(table.rows)), ctx.rng.randrange(len(table.columns))


def _cell_item(table: Table, r: int, c: int) -> dict:
    return {"page": table.page, "row": table.rows[r], "column": table.columns[c], "text": table.cells[r][c]}


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


def cell_lookup(ctx: _Ctx, table: Table) -> QAPair:
    r, c = _pick_cell(ctx, table)
    answer, fmt = cell_answer(table.cells[r][c])
    question = (f"In {_tref(table)}, what value is listed for {_q(table.rows[r])} under the column "
                f"{_q(table.columns[c])}?")
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: the table row {table.rows[r]!r}, column {table.columns[c]!r} reads "
                  f"{table.cells[r][c]!r}.", {"op": "cell", "cells": [_cell_item(table, r, c)]})


def _phrase_candidates(facts: PageFacts) -> list[tuple[str, str]]:
    """(phrase, next word) pairs whose phrase occurs exactly once on the page."""
    stripped = [_key(w) for w, _ in facts.words]
    out = []
    for start, end in facts.blocks_of_words:
        for i in range(start, end - PHRASE_WORDS):
            window = facts.words[i:i + PHRASE_WORDS + 1]
            if not all(usable for _, usable in window):
                continue
            phrase = [w for w, _ in window[:-1]]
            if not all(_WORD.match(w) for w in phrase):
                continue
            nxt = window[-1][0].rstrip(_TRAILING)
            if not _WORD.match(nxt) or sum(ch.isalpha() for ch in nxt) < 3:
                continue
            if facts.phrase_counts[tuple(stripped[i:i + PHRASE_WORDS])] != 1:
                continue
            out.append((" ".join(phrase), nxt))
    return out


def _next_word_item(ctx: _Ctx, page: int) -> Optional[dict]:
    candidates = _phrase_candidates(ctx.pages[page])
    if not candidates:
        return None
    phrase, word = ctx.rng.choice(candidates)
    return {"page": page, "phrase": phrase, "word": word}


def next_word_single(ctx: _Ctx, page: int) -> Optional[QAPair]:
    item = _next_word_item(ctx, page)
    if item is None:
        return None
    question = f"On Page {page}, which word comes directly after the words {_q(item['phrase'])}?"
    return QAPair(question, item["word"], "String", [page], ["Text"],
                  f"Page {page}: the running text reads {item['phrase']!r} followed by {item['word']!r}.",
                  {"op": "next_word", "items": [item]})


def heading_single(ctx: _Ctx, page: int) -> QAPair:
    text = ctx.pages[page].headings[0]
    return QAPair(f"What section heading is printed on Page {page}?", text, "String", [page], ["Layout"],
                  f"Page {page} carries one section heading, {text!r}.", {"op": "heading", "items": [
                      {"page": page, "text": text}]})


def _caption_kinds(facts: PageFacts) -> dict[str, str]:
    """kind ("figure" | "table") -> caption, for kinds with exactly one caption on the page."""
    by_kind: dict[str, list[str]] = {}
    for caption in facts.captions:
        m = _CAPTION_KIND.match(caption)
        if not caption or not m or len(caption) > MAX_TEXT_ANSWER_CHARS:
            return {}  # a caption we cannot read safely: "the figure on Page N" might mean it
        word = m.group(1).lower()
        kind = "table" if word in ("table", "tabelle", "表") else "figure"
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
    tables = ctx.with_tables()
    if len(tables) < 2:
        return None
    chosen = sorted(ctx.rng.sample(tables, min(len(tables), ctx.rng.choice((2, 3)))), key=lambda t: t.page)
    items, parts = [], []
    for table in chosen:
        r, c = _pick_cell(ctx, table)
        items.append(_cell_item(table, r, c))
        parts.append(f"the {_q(table.columns[c])} value of {_q(table.rows[r])} in {_tref(table)}")
    question = f"List {_join(parts)}, in that order."
    return QAPair(question, [i["text"] for i in items], "List", [t.page for t in chosen], ["Table"],
                  "; ".join(f"Page {i['page']}: {i['row']!r}/{i['column']!r} = {i['text']!r}" for i in items),
                  {"op": "cell", "cells": items})


def next_words_multi(ctx: _Ctx) -> Optional[QAPair]:
    items = [i for i in (_next_word_item(ctx, p) for p in sorted(ctx.pages)) if i is not None]
    if len(items) < 2:
        return None
    chosen = sorted(ctx.rng.sample(items, min(len(items), ctx.rng.choice((2, 3)))), key=lambda i: i["page"])
    parts = [f"the word after {_q(i['phrase'])} on Page {i['page']}" for i in chosen]
    question = f"Give {_join(parts)}, in that order."
    return QAPair(question, [i["word"] for i in chosen], "List", [i["page"] for i in chosen], ["Text"],
                  "; ".join(f"Page {i['page']}: {i['phrase']!r} -> {i['word']!r}" for i in chosen),
                  {"op": "next_word", "items": chosen})


def row_values(ctx: _Ctx) -> Optional[QAPair]:
    """Fallback of extract-multi (one page): several values of one table row."""
    tables = [t for t in ctx.with_tables() if len(t.columns) >= 2]
    if not tables:
        return None
    table = ctx.rng.choice(tables)
    r = ctx.rng.randrange(len(table.rows))
    cols = sorted(ctx.rng.sample(range(len(table.columns)), min(len(table.columns), ctx.rng.randint(2, 4))))
    names = [_q(table.columns[c]) for c in cols]
    question = f"In {_tref(table)}, what are the values of {_q(table.rows[r])} under {_join(names)}, in that order?"
    items = [_cell_item(table, r, c) for c in cols]
    return QAPair(question, [i["text"] for i in items], "List", [table.page], ["Table"],
                  f"Page {table.page}: row {table.rows[r]!r} gives " + ", ".join(i["text"] for i in items),
                  {"op": "cell", "cells": items})


# ---- reasoning


def _numeric_columns(table: Table, rows: Sequence[int]) -> list[int]:
    return [c for c in range(len(table.columns)) if table.numeric_column(c, rows) is not None]


def table_difference(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    rows = table.plain_rows() or list(range(len(table.rows)))
    cols = _numeric_columns(table, rows)
    if not cols:
        return None
    c = ctx.rng.choice(cols)
    if len(rows) < 2:
        return None
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
    rows = table.plain_rows()
    cols = _numeric_columns(table, rows)
    if len(rows) < 2 or not cols:
        return None
    c = ctx.rng.choice(cols)
    chosen = sorted(ctx.rng.sample(rows, min(len(rows), ctx.rng.randint(2, 4))))
    nums = [parse_number(table.cells[r][c]) for r in chosen]
    decimals = max(n.decimals for n in nums)  # type: ignore[union-attr]
    total = sum((n.value for n in nums), Decimal(0))  # type: ignore[union-attr]
    answer, fmt = answer_for(nums[0], total, decimals)  # type: ignore[arg-type]
    names = _join([_q(table.rows[r]) for r in chosen])
    question = f"In {_tref(table)}, what is the sum of the {_q(table.columns[c])} values of {names}?"
    return QAPair(question, answer, fmt, [table.page], ["Table"],
                  f"Page {table.page}: " + " + ".join(table.cells[r][c] for r in chosen) + f" = {answer}",
                  {"op": "sum", "cells": [_cell_item(table, r, c) for r in chosen]})


def table_extreme(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    rows = table.plain_rows()
    cols = _numeric_columns(table, rows)
    if len(rows) < 3 or not cols:
        return None
    c = ctx.rng.choice(cols)
    chosen = sorted(ctx.rng.sample(rows, min(len(rows), ctx.rng.randint(3, 5))))
    values = {r: parse_number(table.cells[r][c]).value for r in chosen}  # type: ignore[union-attr]
    largest = ctx.rng.random() < 0.5
    best = max(values.values()) if largest else min(values.values())
    winners = [r for r, v in values.items() if v == best]
    if len(winners) != 1:
        return None
    word = "largest" if largest else "smallest"
    names = _join([_q(table.rows[r]) for r in chosen])
    question = f"In {_tref(table)}, which of {names} has the {word} {_q(table.columns[c])} value?"
    return QAPair(question, table.rows[winners[0]], "String", [table.page], ["Table"],
                  f"Page {table.page}: " + ", ".join(f"{table.rows[r]} {table.cells[r][c]}" for r in chosen),
                  {"op": "argmax" if largest else "argmin", "cells": [_cell_item(table, r, c) for r in chosen]})


def table_count(ctx: _Ctx, table: Table) -> Optional[QAPair]:
    rows = table.plain_rows()
    cols = _numeric_columns(table, rows)
    if len(rows) < 3 or not cols:
        return None
    c = ctx.rng.choice(cols)
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


def cross_page_arithmetic(ctx: _Ctx) -> Optional[QAPair]:
    tables = ctx.with_tables()
    if len(tables) < 2:
        return None
    t1, t2 = sorted(ctx.rng.sample(tables, 2), key=lambda t: t.page)
    picks = []
    for table in (t1, t2):
        options = [(r, c) for r in table.plain_rows() for c in range(len(table.columns))
                   if parse_number(table.cells[r][c]) is not None]
        if not options:
            return None
        picks.append(ctx.rng.choice(options))
    a, b = parse_number(t1.cells[picks[0][0]][picks[0][1]]), parse_number(t2.cells[picks[1][0]][picks[1][1]])
    assert a is not None and b is not None
    if a.unit != b.unit:
        return None
    decimals = max(a.decimals, b.decimals)
    items = [_cell_item(t1, *picks[0]), _cell_item(t2, *picks[1])]
    parts = [f"the {_q(i['column'])} value of {_q(i['row'])} in the table on Page {i['page']}" for i in items]
    if ctx.rng.random() < 0.5:
        answer, fmt = answer_for(a, a.value + b.value, decimals)
        question, op = f"What is the sum of {parts[0]} and {parts[1]}?", "sum"
    else:
        answer, fmt = answer_for(a, a.value - b.value, decimals)
        question, op = f"What is {parts[0]} minus {parts[1]}?", "difference"
    return QAPair(question, answer, fmt, [t1.page, t2.page], ["Table"],
                  f"Pages {t1.page} and {t2.page}: {items[0]['text']} and {items[1]['text']} give {answer}.",
                  {"op": op, "cells": items})


def heading_gap(ctx: _Ctx) -> Optional[QAPair]:
    pages = [p for p in sorted(ctx.pages) if ctx.pages[p].headings
             and ctx.heading_counts[_key(ctx.pages[p].headings[0])] == 1]
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
        for table in tables[:4]:
            for _ in range(3):  # a draw may hit a tie or a non-numeric column; try a few
                pair = fn(ctx, table)
                if pair is not None:
                    return pair
        return None
    return make


SINGLE: dict[str, Maker] = {
    "table_cell": _per_table(cell_lookup),
    "heading": _per_page(heading_single, lambda f: bool(f.headings)),
    "caption": _per_page(caption_single, lambda f: bool(f.captions)),
    "key_value": _per_page(kv_single, lambda f: bool(f.kv)),
    "next_word": _per_page(next_word_single, lambda f: len(f.words) > PHRASE_WORDS),
}
MULTI: dict[str, Maker] = {
    "table_cells": cells_multi,
    "headings": headings_multi,
    "captions": captions_multi,
    "next_words": next_words_multi,
}
MULTI_FALLBACK: dict[str, Maker] = {"row_values": row_values}
REASONING: dict[str, Maker] = {
    "difference": _per_table(table_difference),
    "sum": _per_table(table_sum),
    "extreme": _per_table(table_extreme),
    "count": _per_table(table_count),
    "cross_page": cross_page_arithmetic,
}
REASONING_FALLBACK: dict[str, Maker] = {"page_gap": heading_gap}
PLAN: dict[str, tuple[dict[str, Maker], ...]] = {
    "extract-single": (SINGLE,),
    "extract-multi": (MULTI, MULTI_FALLBACK),
    "reasoning": (REASONING, REASONING_FALLBACK),
}


class OfflineTeacher:
    """QA pairs from the pool's blocks (see the module docstring); deterministic per request seed."""

    kind = "offline"

    def __init__(self, model: str = OFFLINE_MODEL, cached_documents: int = 16):
        self.model = model
        self.usage = Usage()
        self._blocks: "OrderedDict[str, list[dict]]" = OrderedDict()
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

    def context(self, request: TeacherRequest) -> _Ctx:
        record = request.record
        blocks = self._doc_blocks(request.pool_dir, record)
        by_page = {int(p["page"]): p for p in blocks}
        toc: Optional[dict[int, list[str]]] = None
        if record.section_source == "toc":
            toc = {}
            for section in record.sections:
                toc.setdefault(section.first_page, []).append(section.title)
        pages = {}
        for page in range(request.first_page, request.last_page + 1):
            if page in by_page:
                pages[page] = page_facts(by_page[page], None if toc is None else toc.get(page, []))
        heading_counts: Counter = Counter(_key(_clean(b.get("text", ""))) for p in blocks for b in p.get("blocks", [])
                                          if b.get("label") == "section")
        return _Ctx(request.first_page, request.last_page, pages, heading_counts, random.Random(request.seed))

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
                    return TeacherResult(pair=pair)
        return TeacherResult(drop_reason="no_usable_facts",
                             detail=f"pages {request.first_page}-{request.last_page} hold no fact usable for "
                                    f"{request.task} (text-layer tables, headings, captions, key-value lines, text)")


__all__ = [
    "OFFLINE_MODEL",
    "Num",
    "OfflineTeacher",
    "PageFacts",
    "Table",
    "answer_for",
    "cell_answer",
    "page_facts",
    "parse_number",
    "parse_table",
]
