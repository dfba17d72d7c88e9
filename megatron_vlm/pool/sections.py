"""Section structure of a document (headings with page spans), and sampling of coherent 8-15-page
segments from it for long-document VQA synthesis (paper §4.2: "randomly sample one or more
consecutive sections whose total length spans 8-15 pages").

Headings come from the PDF outline when it has one (exact titles and levels), else from the
layout labels (``section`` blocks, levels from numbering and font size). A section runs from its
heading's page to the page before the next heading of the same or a higher level, or to that
heading's page when the next heading starts mid-page (the page is then shared by both sections).
"""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from megatron_vlm.pool.layout import Block
from megatron_vlm.pool.pdf import TocEntry

FRONT_MATTER = "(front matter)"
MAX_SECTIONS = 2_000


@dataclass
class Heading:
    """A section start: title, level (1 = top), 1-based page, and whether it opens its page."""

    title: str
    level: int
    page: int
    starts_page: bool = False  # unknown counts as mid-page: spans may share a page, never miss one


@dataclass
class Section:
    """One entry of a document's section structure (pages 1-based, inclusive)."""

    title: str
    level: int
    first_page: int
    last_page: int
    source: str  # "toc" | "layout" | "pages" (no headings: the whole document)

    @property
    def num_pages(self) -> int:
        return self.last_page - self.first_page + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Section":
        return cls(**{k: data[k] for k in ("title", "level", "first_page", "last_page", "source")})


@dataclass
class Segment:
    """A run of consecutive pages made of whole sections (or a window of one long section)."""

    first_page: int
    last_page: int
    titles: list[str]

    @property
    def num_pages(self) -> int:
        return self.last_page - self.first_page + 1


def _key(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def join_lines(text: str) -> str:
    """One-line form of a multi-line heading, re-joining words hyphenated at a line end."""
    out = ""
    for line in (part.strip() for part in text.splitlines()):
        if not line:
            continue
        if out.endswith("-") and len(out) > 1 and out[-2].isalpha() and line[:1].islower():
            out = out[:-1] + line
        else:
            out = f"{out} {line}" if out else line
    return out


def _opens_page(blocks: Sequence[Block], index: int) -> bool:
    """True when only margin text and other headings precede block ``index`` on its page."""
    return all(b.label in ("header", "footer", "title", "section") for b in blocks[:index])


def headings_from_layout(pages: Sequence[Sequence[Block]]) -> list[Heading]:
    """Headings from ``section`` blocks, in page then reading order."""
    out = []
    for p, blocks in enumerate(pages, start=1):
        for i, block in enumerate(blocks):
            if block.label == "section":
                out.append(Heading(title=join_lines(block.text), level=block.level or 1, page=p,
                                   starts_page=_opens_page(blocks, i)))
    return out


def headings_from_toc(toc: Sequence[TocEntry], pages: Sequence[Sequence[Block]]) -> list[Heading]:
    """Headings from the outline; a heading opens its page if its block is found there and opens it."""
    out = []
    for entry in toc:
        starts = False
        blocks = pages[entry.page - 1] if 0 < entry.page <= len(pages) else ()
        title_key = _key(entry.title)
        for i, block in enumerate(blocks):
            key = _key(block.text)
            same = key == title_key or title_key.startswith(key) or key.startswith(title_key)
            if block.label in ("section", "title") and key and same:
                starts = _opens_page(blocks, i)
                break
        out.append(Heading(title=entry.title, level=entry.level, page=entry.page, starts_page=starts))
    out.sort(key=lambda h: h.page)  # stable: outline order within a page
    return out


def build_sections(headings: Sequence[Heading], num_pages: int, source: str) -> list[Section]:
    """Page spans for headings; pages before the first heading become a front-matter section."""
    if num_pages <= 0:
        return []
    headings = [h for h in headings if 1 <= h.page <= num_pages][:MAX_SECTIONS]
    if not headings:
        return [Section(title="", level=1, first_page=1, last_page=num_pages, source="pages")]
    sections = []
    first = headings[0]
    if first.page > 1:
        last = first.page - 1 if first.starts_page else first.page
        sections.append(Section(title=FRONT_MATTER, level=min(h.level for h in headings), first_page=1,
                                last_page=max(1, last), source=source))
    for i, heading in enumerate(headings):
        last = num_pages
        for nxt in headings[i + 1:]:
            if nxt.level <= heading.level:
                last = nxt.page - 1 if nxt.starts_page else nxt.page
                break
        sections.append(Section(title=heading.title, level=heading.level, first_page=heading.page,
                                last_page=max(heading.page, last), source=source))
    return sections


OUTLINE_FUZZY_MIN_CHARS = 6  # shorter titles must appear exactly


def title_on_page(title_key: str, page_key: str) -> bool:
    """Whether an outline title (``_key`` form) is printed on the page: exactly, or, for titles of
    ``OUTLINE_FUZZY_MIN_CHARS`` or more, within max(1, 10%) dropped or changed characters. Text layers
    often lose ligature glyphs ('udesofec' for 'udesoftec', 'Qalifikation' for 'Qualifikation') and
    documents spell umlauts out ('ue' for 'ü'), which would otherwise throw away a good outline."""
    if title_key in page_key:
        return True
    if len(title_key) < OUTLINE_FUZZY_MIN_CHARS:
        return False
    from rapidfuzz import fuzz

    title_key, page_key = _without_accents(title_key), _without_accents(page_key)
    allowed = max(1.0, 0.1 * len(title_key))
    return fuzz.partial_ratio(title_key, page_key) >= 100.0 * (1.0 - allowed / len(title_key)) - 1e-9


def _without_accents(key: str) -> str:
    """Diacritics dropped, so a title 'Einheitsübersetzung' printed 'Einheitsuebersetzung' is one
    character away, not two."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", key) if not unicodedata.combining(ch))


# An outline is only trusted when it looks like the document's: a broken one (18 entries on page 1)
# would give sections that do not contain what their titles promise.
OUTLINE_MAX_PER_PAGE = 15  # more entries than this on one page: crowded
OUTLINE_MAX_SHARE_ON_PAGE = 0.5  # more than this share of the entries (when >= 4) on one page: crowded
OUTLINE_MAX_TITLE_MISSES = 0.2  # share of checkable titles allowed not to appear on the page they name
OUTLINE_MAX_DECREASES = 0.05  # share of entries allowed to point before their predecessor at the same level


def check_outline(toc: Sequence[TocEntry], page_texts: Sequence[str], num_pages: int) -> Optional[str]:
    """Why the outline cannot define sections (one line), or None when it looks right.

    Checks: every page within the document; pages non-decreasing in outline order among entries of
    the same level (a few slips allowed); no page holding more than ``OUTLINE_MAX_PER_PAGE``
    entries, or more than half of them; and each title found (alphanumerics, case-folded, NFKC) in
    the text of the page it names, a small share of misses allowed. Pages without text (scans)
    are not checked for titles. Outlines of fewer than 2 entries are not used anyway: None.
    """
    n = len(toc)
    if n < 2:
        return None
    problems = []
    outside = [e for e in toc if not 1 <= e.page <= num_pages]
    if outside:
        problems.append(f"{len(outside)} of {n} entries point outside pages 1-{num_pages} "
                        f"(e.g. {outside[0].title[:40]!r} -> page {outside[0].page})")
    decreases = 0
    last_at_level: dict[int, int] = {}
    for entry in toc:
        if entry.page < last_at_level.get(entry.level, 0):
            decreases += 1
        last_at_level[entry.level] = entry.page
        for deeper in [lvl for lvl in last_at_level if lvl > entry.level]:
            del last_at_level[deeper]  # a new parent: its children start afresh (and still follow it)
    if decreases > int(OUTLINE_MAX_DECREASES * n):
        problems.append(f"{decreases} of {n} entries point before the previous entry of their level")
    per_page = Counter(e.page for e in toc)
    page, most = per_page.most_common(1)[0]
    if most > OUTLINE_MAX_PER_PAGE or (n >= 4 and most > OUTLINE_MAX_SHARE_ON_PAGE * n):
        problems.append(f"{most} of {n} entries on page {page}")
    page_keys: dict[int, str] = {}
    checked = missed = 0
    example = ""
    for entry in toc:
        if not 1 <= entry.page <= len(page_texts):
            continue
        if entry.page not in page_keys:
            page_keys[entry.page] = _key(page_texts[entry.page - 1])
        title = _key(entry.title)
        if not page_keys[entry.page] or not title:
            continue  # no text layer on that page (or a title of symbols only): nothing to compare
        checked += 1
        if not title_on_page(title, page_keys[entry.page]):
            missed += 1
            example = example or f"{entry.title[:40]!r} not on page {entry.page}"
    if checked and missed > OUTLINE_MAX_TITLE_MISSES * checked:
        problems.append(f"{missed} of {checked} titles not found on their page (e.g. {example})")
    return "; ".join(problems) or None


def document_sections(toc: Sequence[TocEntry], pages: Sequence[Sequence[Block]], num_pages: int) -> list[Section]:
    """The section structure: from the outline when it has >= 2 entries, else from the layout."""
    if len(toc) >= 2:
        return build_sections(headings_from_toc(toc, pages), num_pages, "toc")
    return build_sections(headings_from_layout(pages), num_pages, "layout")


# --------------------------------------------------------------------------------------- sampling


def _units(sections: Sequence[Section], max_pages: int) -> list[Segment]:
    """Consecutive sampling units: top-level sections, opened up into their subsections when longer
    than ``max_pages``; a long section without subsections is cut into near-equal parts."""
    if not sections:
        return []
    units: list[Segment] = []

    def visit(index: int, level: int) -> None:
        section = sections[index]
        children = []
        for j in range(index + 1, len(sections)):
            if sections[j].level <= section.level:
                break
            if not children or sections[j].level <= sections[children[0]].level:
                children.append(j)
        if section.num_pages <= max_pages:
            units.append(Segment(section.first_page, section.last_page, [section.title]))
        elif children:
            lead_last = sections[children[0]].first_page - 1
            if lead_last >= section.first_page:
                units.append(Segment(section.first_page, lead_last, [section.title]))
            for child in children:
                visit(child, level + 1)
        else:
            parts = -(-section.num_pages // max_pages)
            size = -(-section.num_pages // parts)
            for start in range(section.first_page, section.last_page + 1, size):
                units.append(Segment(start, min(start + size - 1, section.last_page), [section.title]))

    lowest = None  # a root is a section no earlier section outranks (e.g. an "Abstract" at level 4)
    for i, section in enumerate(sections):
        if lowest is None or section.level <= lowest:
            visit(i, 0)
        lowest = section.level if lowest is None else min(lowest, section.level)
    units.sort(key=lambda u: (u.first_page, u.last_page))
    return units


def segment_candidates(sections: Sequence[Section], num_pages: int, min_pages: int = 8,
                       max_pages: int = 15) -> list[Segment]:
    """Every run of consecutive units spanning ``min_pages..max_pages`` pages.

    Falls back to the whole document when it is shorter than ``max_pages``, and to ``max_pages``
    windows starting at unit boundaries when no run of whole units fits.
    """
    units = _units(sections, max_pages)
    found: dict[tuple[int, int], Segment] = {}
    for i, start in enumerate(units):
        titles: list[str] = []
        last = 0
        for unit in units[i:]:
            last = max(last, unit.last_page)
            span = last - start.first_page + 1
            if span > max_pages:
                break
            titles.extend(t for t in unit.titles if not titles or titles[-1] != t)
            if span >= min_pages:
                found.setdefault((start.first_page, last), Segment(start.first_page, last, list(titles)))
    if not found and num_pages > 0:
        if num_pages <= max_pages:
            return [Segment(1, num_pages, [t for u in units for t in u.titles][:50])]
        for unit in units or [Segment(1, num_pages, [])]:
            first = min(unit.first_page, num_pages - max_pages + 1)
            found.setdefault((first, first + max_pages - 1), Segment(first, first + max_pages - 1, list(unit.titles)))
    return sorted(found.values(), key=lambda s: (s.first_page, s.last_page))


def sample_segment(sections: Sequence[Section], num_pages: int, rng: random.Random, min_pages: int = 8,
                   max_pages: int = 15) -> Optional[Segment]:
    """One segment drawn uniformly from :func:`segment_candidates` (None for an empty document)."""
    candidates = segment_candidates(sections, num_pages, min_pages, max_pages)
    return rng.choice(candidates) if candidates else None


__all__ = [
    "FRONT_MATTER",
    "Heading",
    "Section",
    "Segment",
    "build_sections",
    "check_outline",
    "document_sections",
    "headings_from_layout",
    "headings_from_toc",
    "sample_segment",
    "segment_candidates",
]
