"""Is a page's text layer what the page shows? A cheap, per-page sanity check of the text layer.

A PDF whose fonts lack a ToUnicode map gives back glyph codes read through some 8-bit table: a
Russian page typeset with cp1251-ordered fonts extracts as Latin-1 look-alikes ("ÎÃËÀÂËÅÍÈÅ"),
other fonts give C0/C1 control characters, replacement characters or private-use code points. Such
text is fluent garbage: language ID names some small Latin-script language with high confidence,
and a teacher happily writes question-answer pairs from it while the page image shows Cyrillic.

What is measured, on the raw text of a page (before whitespace and control cleaning):

- ``latin1_letters``: share of letters in U+00C0..U+00FF. Real French/German/Icelandic text stays
  well under 30 %; a Cyrillic or Greek page read as Latin-1 is 60-90 %.
- ``control``: C0/C1 control characters inside words per visible character (MonTeX's
  Mongolian-script fonts give 5-20 %; a lone ligature such as "ff" -> U+001B stays under 1 %);
  ``undecodable``: U+FFFD, private-use, unassigned and surrogate code points inside words per
  visible character (a picture drawn with glyphs, runs of U+FFFD on their own, does not count).
- ``mixed_words``: share of words whose letters come from two of Latin / Greek / Cyrillic.
- the *repair* test: the page re-encoded to bytes (Latin-1 / cp1252) and decoded with a legacy
  code page (cp1251, KOI8-R, cp1253). When that turns the text into a language py3langid is sure
  of (normalised probability >= 0.9, in that code page's script), the layer is mojibake beyond
  doubt, and its script says which Tesseract language to OCR the page with. The repaired text is
  only evidence: T2A and other TeX encodings differ from cp1251 in their upper half, so the pool
  OCRs the page (or rejects the document) and never stores repaired text.

When a broken page is OCR'd, ``similarity`` compares the OCR of the rendered page with the text
layer and with its repair (letter bigrams beyond ASCII): the record keeps both numbers, and a
layer that agrees with its page's OCR is reported as a suspected false alarm.

Each test names a reason; a page with any reason is ``broken``. A page with under 20 visible
characters is ``empty``; it, and a page that passes here but is mostly punctuation
(``pdf.text_is_usable``), keeps the scan path (OCR with ``--ocr``, otherwise no blocks): no text
is not a misleading text layer.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from megatron_vlm.pool.language import identify_language

MAX_CHECK_CHARS = 50_000  # a page's text is judged on its first characters (plot pages reach ~41k)
MIN_VISIBLE = 20  # fewer visible characters than this: too little to judge (a page number, a title)
MIN_LETTERS = 20
MAX_LATIN1_LETTERS = 0.30  # letters in U+00C0..U+00FF, share of all letters
MAX_CONTROL = 0.03  # control characters inside words, per visible character
MAX_UNDECODABLE = 0.05  # U+FFFD / private use / unassigned inside words, per visible character
MAX_MIXED_WORDS = 0.50  # words mixing Latin, Greek and Cyrillic letters, share of words (>= 10 words);
# high because TeX fonts often map Ukrainian і to Latin i (and back): homoglyphs, readable text
REPAIR_MIN_LATIN1 = 0.10  # below this, the repair test is not tried (an accented Latin page)
REPAIR_MIN_CONFIDENCE = 0.90  # py3langid normalised probability of the repaired text's language
REPAIR_MIN_SCRIPT = 0.40  # share of the repaired text's letters in the code page's script


@dataclass(frozen=True)
class LegacyCodePage:
    """A code page whose text, read as Latin-1, is a known kind of mojibake."""

    codec: str
    script: str
    languages: dict  # py3langid code -> Tesseract language


CODE_PAGES = (
    LegacyCodePage("cp1251", "Cyrillic", {"ru": "rus", "uk": "ukr", "bg": "bul", "be": "bel", "mk": "mkd", "sr": "srp",
                                          "kk": "kaz", "ky": "kir", "mn": "mon"}),
    LegacyCodePage("koi8_r", "Cyrillic", {"ru": "rus", "uk": "ukr", "bg": "bul", "be": "bel"}),
    LegacyCodePage("cp1253", "Greek", {"el": "ell"}),
)
SCRIPT_TESSERACT = {"Cyrillic": "rus", "Greek": "ell"}  # when the exact language's data is missing


@dataclass
class Repair:
    """Evidence that the text layer is a legacy code page read as Latin-1."""

    codec: str
    script: str
    language: str  # py3langid code of the repaired text
    confidence: float
    tesseract: str  # Tesseract language for the page (language's own, else the script's default)
    sample: str  # the first repaired characters, for the report (not stored as page text)


@dataclass
class PageTextCheck:
    """The verdict on one page's text layer: ``ok``, ``empty`` (nothing to judge) or ``broken``.

    ``reasons`` are codes: mojibake_<codec>, latin1_lookalikes, control_chars, undecodable,
    mixed_scripts.
    """

    verdict: str
    reasons: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    repair: Optional[Repair] = None
    text: str = field(default="", repr=False)  # the judged text, kept for broken pages only

    @property
    def repaired_text(self) -> str:
        """The broken text re-decoded with the repair's code page ("" without a repair)."""
        return self.text.translate(_repair_table(self.repair.codec)) if self.repair is not None else ""

    @property
    def broken(self) -> bool:
        return self.verdict == "broken"

    def describe(self) -> str:
        """The reasons with their measurements, for warnings and rejections."""
        parts = []
        for reason in self.reasons:
            if reason.startswith("mojibake_") and self.repair is not None:
                repair = self.repair
                parts.append(f"{repair.script} text read as Latin-1 ({repair.codec} mojibake: re-decoded it is "
                             f"{repair.language} at p={repair.confidence:.2f}, \"{repair.sample[:40]}\")")
            elif reason == "latin1_lookalikes":
                parts.append(f"{self.stats['latin1_letters']:.0%} of letters are Latin-1 look-alikes")
            elif reason == "control_chars":
                parts.append(f"{self.stats['control']:.0%} control characters")
            elif reason == "undecodable":
                parts.append(f"{self.stats['undecodable']:.0%} undecodable characters")
            elif reason == "mixed_scripts":
                parts.append(f"{self.stats['mixed_words']:.0%} of words mix scripts")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        out = {"verdict": self.verdict, "reasons": list(self.reasons), "stats": dict(self.stats)}
        if self.repair is not None:
            out["repair"] = asdict(self.repair)
        return out


# ------------------------------------------------------------------------------ character classes


def _script(ch: str) -> Optional[str]:
    """Latin / Greek / Cyrillic for letters of those scripts, None for anything else."""
    cp = ord(ch)
    if cp < 0x250 or 0x1E00 <= cp < 0x1F00:
        return "Latin"
    if 0x370 <= cp < 0x400 or 0x1F00 <= cp < 0x2000:
        return "Greek"
    if 0x400 <= cp < 0x530:
        return "Cyrillic"
    return None


_WORD = re.compile(r"[^\W\d_]{2,}")


def character_stats(text: str) -> dict:
    """Character-class statistics of ``text`` (see the module docstring), rounded for records.

    Control and undecodable characters count only inside words (tokens that also hold letters):
    a picture drawn with TeX's line fonts gives runs of U+FFFD between whitespace, which is no
    text at all, while a font read through the wrong table garbles the words themselves.
    """
    visible = letters = latin1 = control = undecodable = 0
    for token in text.split():
        in_word = any(ch.isalpha() for ch in token)
        for ch in token:
            visible += 1
            if ch.isalpha():
                letters += 1
                if 0xC0 <= ord(ch) <= 0xFF:
                    latin1 += 1
                continue
            if not in_word:
                continue
            category = unicodedata.category(ch)
            if category == "Cc":
                control += 1
            elif ch == "\ufffd" or category in ("Co", "Cn", "Cs"):
                undecodable += 1
    words = mixed = 0
    for word in _WORD.findall(text):
        words += 1
        scripts = {_script(ch) for ch in word} - {None}
        if len(scripts) > 1:
            mixed += 1
    return {
        "visible": visible,
        "letters": letters,
        "latin1_letters": round(latin1 / letters, 4) if letters else 0.0,
        "control": round(control / visible, 4) if visible else 0.0,
        "undecodable": round(undecodable / visible, 4) if visible else 0.0,
        "words": words,
        "mixed_words": round(mixed / words, 4) if words else 0.0,
    }


# -------------------------------------------------------------------------------------- language

# ---------------------------------------------------------------------------------------- repair


def _as_bytes_table() -> dict[int, int]:
    """Code point -> byte for characters a PDF reader emits for 8-bit glyph codes (Latin-1 and
    the cp1252 punctuation MuPDF uses for 0x80..0x9F)."""
    table = {cp: cp for cp in range(0x100)}
    for byte in range(0x80, 0xA0):
        try:
            table[ord(bytes([byte]).decode("cp1252"))] = byte
        except UnicodeDecodeError:
            pass
    return table


_BYTES = _as_bytes_table()
_REPAIR_TABLES: dict[str, dict[int, str]] = {}


def _repair_table(codec: str) -> dict[int, str]:
    if codec not in _REPAIR_TABLES:
        table = {}
        for cp, byte in _BYTES.items():
            if byte >= 0x80:
                table[cp] = bytes([byte]).decode(codec, errors="replace")
        _REPAIR_TABLES[codec] = table
    return _REPAIR_TABLES[codec]


def try_repair(text: str, has_data: Optional[Callable[[str], bool]] = None) -> Optional[Repair]:
    """The legacy code page that turns ``text`` into confident language of its script, or None.

    ``has_data(lang)``: whether Tesseract has data for ``lang``; the language's own is preferred,
    else the script's default is named.
    """
    best: Optional[Repair] = None
    for page in CODE_PAGES:
        repaired = text.translate(_repair_table(page.codec))
        letters = [ch for ch in repaired if ch.isalpha()]
        if not letters or sum(1 for ch in letters if _script(ch) == page.script) / len(letters) < REPAIR_MIN_SCRIPT:
            continue
        language, confidence = identify_language(repaired)
        if language not in page.languages or confidence < REPAIR_MIN_CONFIDENCE:
            continue
        if best is None or confidence > best.confidence:
            tesseract = page.languages[language]
            if has_data is not None and not has_data(tesseract):
                tesseract = SCRIPT_TESSERACT[page.script]
            best = Repair(codec=page.codec, script=page.script, language=language, confidence=confidence,
                          tesseract=tesseract, sample=" ".join(repaired.split())[:80])
    return best


# ------------------------------------------------------------------------------------------ page


def check_page_text(text: str, has_data: Optional[Callable[[str], bool]] = None) -> PageTextCheck:
    """Judge one page's raw text layer (see the module docstring for the tests and thresholds)."""
    stats = character_stats(text)
    if stats["visible"] < MIN_VISIBLE:
        return PageTextCheck("empty", stats=stats)
    reasons = []
    repair = None
    if stats["letters"] >= MIN_LETTERS and stats["latin1_letters"] >= REPAIR_MIN_LATIN1:
        repair = try_repair(text, has_data)
        if repair is not None:
            reasons.append(f"mojibake_{repair.codec}")
        elif stats["latin1_letters"] > MAX_LATIN1_LETTERS:
            reasons.append("latin1_lookalikes")
    if stats["control"] > MAX_CONTROL:
        reasons.append("control_chars")
    if stats["undecodable"] > MAX_UNDECODABLE:
        reasons.append("undecodable")
    if stats["words"] >= 10 and stats["mixed_words"] > MAX_MIXED_WORDS:
        reasons.append("mixed_scripts")
    return PageTextCheck("broken" if reasons else "ok", reasons=reasons, stats=stats, repair=repair,
                         text=text if reasons else "")


def _bigrams(text: str, non_ascii: bool) -> Counter:
    words = "".join(ch.lower() if ch.isalpha() else " " for ch in text).split()
    grams = (word[i:i + 2] for word in words for i in range(len(word) - 1))
    return Counter(g for g in grams if not non_ascii or not g.isascii())


def similarity(a: str, b: str, non_ascii: bool = False) -> float:
    """Dice coefficient of the letter bigrams of two texts, in [0, 1]: how far a text layer (or its
    repair) agrees with the OCR of the rendered page. ``non_ascii``: only bigrams with a letter
    beyond ASCII, the part a broken layer garbles (its English words agree with any OCR). A
    mojibake layer scores ~0 there against the OCR, a good one ~0.8-1 (OCR misreads a few letters)."""
    x, y = _bigrams(a, non_ascii), _bigrams(b, non_ascii)
    total = sum(x.values()) + sum(y.values())
    return round(2 * sum((x & y).values()) / total, 4) if total else 0.0


# -------------------------------------------------------------------------------------- document


@dataclass
class BrokenPagePlan:
    """What happens to a document's broken pages: OCR (page -> Tesseract languages) or nothing."""

    broken: list[int]  # 1-based
    ocr: dict[int, str]
    unrepaired: list[int]  # broken pages that keep no blocks
    advice: list[str]  # why the unrepaired ones are not OCR'd, and what to do


def plan_broken_pages(checks: Sequence[PageTextCheck], policy: str, budget: int, fallback_languages: Optional[str],
                      has_data: Callable[[str], bool]) -> BrokenPagePlan:
    """Choose how each broken page is read: OCR in the language its repair names (plus English
    when installed: manuals quote commands; a look-alike page without a repair of its own takes
    its document's most common one), in ``fallback_languages`` when the script is unknown
    (the user's ``--ocr-languages``; None: no OCR), within ``budget`` pages; policy "reject": none."""
    plan = BrokenPagePlan(broken=[], ocr={}, unrepaired=[], advice=[])
    missing: set[str] = set()
    # a page of Latin-1 look-alikes whose own repair was not conclusive (a table of contents, a
    # short page) shares the script its document's repaired pages showed
    repaired = Counter(c.repair.tesseract for c in checks if c.repair is not None)
    document_languages = repaired.most_common(1)[0][0] if repaired else None
    for number, check in enumerate(checks, start=1):
        if not check.broken:
            continue
        plan.broken.append(number)
        if check.repair is not None:
            languages = check.repair.tesseract
        elif document_languages and check.reasons == ["latin1_lookalikes"]:
            languages = document_languages
        else:
            languages = fallback_languages
        if languages and "eng" not in languages.split("+") and has_data("eng"):
            languages += "+eng"
        if policy != "ocr":
            why = "not OCR'd under --broken-text-layer reject (use --broken-text-layer ocr)"
        elif not languages:
            why = "script unknown: pass --ocr --ocr-languages with the language these pages show"
        elif not has_data(languages):
            missing.update(lang for lang in languages.split("+") if not has_data(lang))
            why = ""
        elif budget <= 0:
            why = "OCR page budget spent: raise --ocr-max-pages"
        else:
            plan.ocr[number] = languages
            budget -= 1
            continue
        plan.unrepaired.append(number)
        if why and why not in plan.advice:
            plan.advice.append(why)
    if missing:
        names = " ".join(f"tesseract-ocr-{lang}" for lang in sorted(missing))
        plan.advice.insert(0, f"no Tesseract data for {'+'.join(sorted(missing))}: apt-get install {names}")
    return plan


def page_ranges(pages: list[int]) -> str:
    """1-based page numbers as "1, 3-7, 9" (short in messages)."""
    parts: list[tuple[int, int]] = []
    for page in sorted(pages):
        if parts and page == parts[-1][1] + 1:
            parts[-1] = (parts[-1][0], page)
        else:
            parts.append((page, page))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


__all__ = [
    "CODE_PAGES",
    "BrokenPagePlan",
    "PageTextCheck",
    "Repair",
    "character_stats",
    "check_page_text",
    "page_ranges",
    "plan_broken_pages",
    "similarity",
    "try_repair",
]
