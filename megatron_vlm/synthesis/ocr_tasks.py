"""The OCR-transcription baselines (paper §4.3, Appendix E): the whole document's pages as input and
the pool's text blocks as the target.

- OCR-full: transcribe every page, in order;
- OCR-needle: transcribe 1-3 chosen pages; the other pages stay in the input as distractors.

Targets keep the text elements the recipe keeps (titles, section headings, paragraphs, lists,
tables, captions) and leave out running headers and footers. Every page's part starts with a
``Page N:`` line (N counts the page images from 1), tables are written row by row with `` | ``
between cells (as the pool stores them). A page without a text layer whose image is not blank
(a scan without OCR) has no trustworthy target: OCR-full drops such a document, OCR-needle never
picks such a page.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_vlm.pool.records import DocRecord

OCR_PROMPT_VERSION = "mvlm-ocr-prompt/v1"
KEEP_LABELS = ("title", "section", "paragraph", "list", "table", "caption")
MIN_NEEDLE_CHARS = 20
NO_TEXT = "(no text)"
_RULES = ("Keep the reading order of each page, write tables row by row with \" | \" between cells, and leave out "
          "running headers, footers and page numbers.")


@dataclass
class OcrInstance:
    """An OCR instance before it becomes a sample; ``drop_reason`` set when there is none."""

    question: str = ""
    answer: str = ""
    pages: list[int] = field(default_factory=list)  # transcribed pages, 1-based
    drop_reason: Optional[str] = None
    detail: str = ""


def page_transcript(page_record: dict) -> str:
    """The target text of one page: its kept blocks in reading order, one blank line apart."""
    parts = []
    for block in page_record.get("blocks") or []:
        if block.get("label") in KEEP_LABELS:
            text = "\n".join(line.rstrip() for line in str(block.get("text", "")).strip().splitlines())
            if text:
                parts.append(text)
    return "\n\n".join(parts)


def image_is_blank(path: str, spread: int = 24) -> bool:
    """True for an empty-looking page image (a blank page), False for one with visible content."""
    from PIL import Image

    with Image.open(path) as image:
        gray = image.convert("L")
        gray.thumbnail((256, 256))
        low, high = gray.getextrema()
    return high - low < spread


def _text_pages(record: DocRecord, blocks: Sequence[dict]) -> dict[int, str]:
    return {int(p["page"]): page_transcript(p) for p in blocks}


def ocr_full(record: DocRecord, blocks: Sequence[dict], pool_dir: str) -> OcrInstance:
    """Transcribe all pages (or the reason this document cannot give a trustworthy target)."""
    texts = _text_pages(record, blocks)
    if sorted(texts) != list(range(1, record.num_pages + 1)):
        return OcrInstance(drop_reason="blocks_incomplete",
                           detail=f"block file has pages {sorted(texts)[:5]}... for {record.num_pages} pages")
    sources = {int(p["page"]): p.get("source") for p in blocks}
    for page in range(1, record.num_pages + 1):
        if sources[page] == "none" and not image_is_blank(os.path.join(pool_dir, record.pages[page - 1].image)):
            return OcrInstance(drop_reason="page_text_missing",
                               detail=f"page {page} has content but no text layer (build the pool with --ocr)")
    if not any(texts.values()):
        return OcrInstance(drop_reason="no_text", detail="no page has text")
    n = record.num_pages
    question = (f"Transcribe the text of all {n} pages of this document, in order. Begin each page with a line "
                f"\"Page N:\" and write \"{NO_TEXT}\" for a page without text. {_RULES}")
    answer = "\n\n".join(f"Page {p}:\n{texts[p] or NO_TEXT}" for p in range(1, n + 1))
    return OcrInstance(question=question, answer=answer, pages=list(range(1, n + 1)))


def ocr_needle(record: DocRecord, blocks: Sequence[dict], rng: random.Random, max_needles: int = 3) -> OcrInstance:
    """Transcribe 1..max_needles pages chosen among the pages with text; the rest are distractors."""
    sources = {int(p["page"]): p.get("source") for p in blocks}
    texts = _text_pages(record, blocks)
    usable = [p for p in sorted(texts) if sources.get(p) in ("text", "ocr") and len(texts[p]) >= MIN_NEEDLE_CHARS]
    if not usable:
        return OcrInstance(drop_reason="no_text", detail="no page has enough text to transcribe")
    count = rng.randint(1, max(1, min(max_needles, len(usable))))
    pages = sorted(rng.sample(usable, count))
    named = (f"Page {pages[0]}" if len(pages) == 1 else
             "Pages " + ", ".join(str(p) for p in pages[:-1]) + f" and {pages[-1]}")
    only = "that page" if len(pages) == 1 else "those pages"
    question = (f"Transcribe the text of {named} of this document, and only {only}. Begin each transcribed page "
                f"with a line \"Page N:\". {_RULES}")
    answer = "\n\n".join(f"Page {p}:\n{texts[p]}" for p in pages)
    return OcrInstance(question=question, answer=answer, pages=pages)


__all__ = [
    "KEEP_LABELS",
    "OCR_PROMPT_VERSION",
    "OcrInstance",
    "image_is_blank",
    "ocr_full",
    "ocr_needle",
    "page_transcript",
]
