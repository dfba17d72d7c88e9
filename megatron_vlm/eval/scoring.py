"""Rule-based scores for document-QA answers (``--judge rules``; the default for our own data).

MMLongBench's official rule metric, which differs on purpose in several places (any number in
the prediction, F1 for "Not answerable", verbatim exact-match golds, merged lists), is
``mmlb_rules.py`` (``--judge mmlb-rules``, the default for MMLongBench data).

One rule per answer shape, all returning a score in [0, 1]:

* **Not answerable** (``answer_format`` "None" or a gold "Not answerable"): 1 when the prediction
  says the question cannot be answered, else 0.
* **Numbers** (Integer, Float, and String golds that are a plain number): integers must be equal,
  other values within 1% (relative); the prediction may also be the gold x100 or /100 (25% vs
  0.25). Thousand/million/billion words and k/M/B suffixes are understood, currency and unit
  words ignored.
* **Exact strings**: URLs, e-mail addresses, dates and identifiers (codes mixing letters and
  digits) must match after light normalisation (case, scheme, ``www.``, surrounding punctuation).
* **Other strings**: token F1 over lower-cased words without punctuation and articles.
* **Lists**: both sides split into items; items are paired greedily by their item score
  (order does not matter) and the soft match count gives precision/recall F1.

An empty prediction (after stripping an "Answer:" prefix) scores 0.
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

NOT_ANSWERABLE = "Not answerable"

_NA_PATTERNS = re.compile(
    r"\b(not answerable|unanswerable|cannot be answered|can ?not be answered|can't be answered|"
    r"could not be answered|no answer|not possible to (?:answer|determine|tell)|cannot be determined|"
    r"can't be determined|cannot determine|unable to (?:answer|determine)|"
    r"(?:is|are) not (?:mentioned|provided|stated|given|specified|shown|available|found)|"
    r"does not (?:mention|provide|state|contain|specify|say)|do not (?:mention|provide|state|contain)|"
    r"no information|not enough information|insufficient information)\b",
    re.IGNORECASE,
)
_URL = re.compile(r"^(?:https?://|www\.)\S+$|^[a-z0-9-]+(?:\.[a-z0-9-]+)+(?:/\S*)?$", re.IGNORECASE)
_EMAIL = re.compile(r"^[\w.+-]+@[\w-]+(?:\.[\w-]+)+$")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DATE = re.compile(
    r"^(?:\d{4}[-/.]\d{1,2}(?:[-/.]\d{1,2})?|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|"
    r"(?:\d{1,2}(?:st|nd|rd|th)?\s+)?(?:" + "|".join(_MONTHS) + r")[a-z]*\.?(?:\s+\d{1,2}(?:st|nd|rd|th)?)?,?\s*\d{4}|"
    r"(?:" + "|".join(_MONTHS) + r")[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?)$",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?![\d])")
_SCALE_WORDS = {"thousand": 1e3, "k": 1e3, "million": 1e6, "mn": 1e6, "m": 1e6, "billion": 1e9, "bn": 1e9,
                "b": 1e9, "trillion": 1e12, "tn": 1e12}
_ARTICLES = {"a", "an", "the"}
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation + "“”‘’–—…·•"})


@dataclass(frozen=True)
class NumberValue:
    value: float
    scaled: Optional[float] = None  # with a thousand/million/... word applied
    percent: bool = False


# ------------------------------------------------------------------------- normalisation
def clean_prediction(prediction: Any) -> str:
    """The model's answer without an "Answer:" prefix, markdown emphasis, quotes or a final period."""
    if prediction is None:
        return ""
    text = str(prediction).strip()
    text = re.sub(r"^(?:\*\*)?\s*(?:final\s+)?answer\s*(?:\*\*)?\s*[:：]\s*", "", text, flags=re.IGNORECASE)
    text = text.replace("**", "").replace("__", "").strip().rstrip(".").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text.rstrip(".").strip()


def normalize_words(text: str) -> list[str]:
    """Lower-cased words, punctuation and articles removed (SQuAD-style), for token F1."""
    words = str(text).lower().translate(_PUNCT_TABLE).split()
    return [w for w in words if w not in _ARTICLES]


def _normalize_exact(text: str) -> str:
    text = str(text).strip().lower()
    text = re.sub(r"^https?://", "", text)
    text = re.sub(r"^www\.", "", text)
    text = text.strip(" \t\n\"'`.,;:()[]{}<>")
    return text.rstrip("/")


def is_not_answerable(text: Any) -> bool:
    return bool(_NA_PATTERNS.search(str(text or "")))


def gold_is_not_answerable(answer: Any, answer_format: Optional[str]) -> bool:
    """Format "None" or a gold that reads "Not answerable" (MMLongBench uses both)."""
    gold = str(answer if answer is not None else "").strip().lower().rstrip(".")
    return gold == "not answerable" or (str(answer_format) == "None" and gold in ("", "none"))


# ------------------------------------------------------------------------- numbers
def parse_numbers(text: str) -> list[NumberValue]:
    """Every number in ``text`` in order, with its scale word and percent sign if any."""
    out = []
    for match in _NUMBER.finditer(text):
        raw = match.group(0)
        if not any(ch.isdigit() for ch in raw):
            continue
        try:
            value = float(raw.replace(",", "").replace("−", "-"))
        except ValueError:
            continue
        rest = text[match.end():match.end() + 16]
        percent = bool(re.match(r"\s*(?:%|percent\b|per cent\b|pct\b)", rest, re.IGNORECASE))
        word = re.match(r"\s*([A-Za-z]+)\b", rest)
        scaled = None
        if word:
            w = word.group(1)
            # "m"/"b" in lower case are metres/bytes more often than millions/billions
            if w.lower() in _SCALE_WORDS and w not in ("m", "b"):
                scaled = value * _SCALE_WORDS[w.lower()]
        out.append(NumberValue(value, scaled, percent))
    return out


def parse_plain_number(text: str) -> Optional[NumberValue]:
    """The number ``text`` consists of (currency, %, scale and unit words allowed), else None."""
    text = clean_prediction(text)
    numbers = parse_numbers(text)
    if len(numbers) != 1:
        return None
    stripped = _NUMBER.sub(" ", text, count=1)
    leftover = re.sub(r"[$€£¥%,~≈]|\b(?:about|approximately|around|usd|eur|gbp|rmb|cny|percent|per cent|pct|"
                      r"thousand|million|billion|trillion|mn|bn|tn|k|m|b)\b", " ", stripped, flags=re.IGNORECASE)
    return numbers[0] if len(leftover.split()) <= 2 else None


def _candidates(number: NumberValue) -> list[float]:
    values = [number.value]
    if number.scaled is not None:
        values.append(number.scaled)
    return values


def numbers_match(gold: NumberValue, pred: NumberValue, exact: bool) -> bool:
    """Equal (``exact``) or within 1%, also after x100 or /100 (percent vs fraction)."""
    for g in _candidates(gold):
        for p in _candidates(pred):
            for factor in (1.0, 100.0, 0.01):
                q = p * factor
                if exact:
                    if math.isclose(q, g, rel_tol=1e-9, abs_tol=1e-9):
                        return True
                elif math.isclose(q, g, rel_tol=0.01, abs_tol=1e-12):
                    return True
    return False


def _is_integral(number: NumberValue) -> bool:
    return float(number.value).is_integer()


def score_number(gold: NumberValue, prediction: str, integer: bool) -> float:
    """The prediction's first number decides (a model listing several numbers gets no extra chances)."""
    plain = parse_plain_number(prediction)
    pred = plain if plain is not None else next(iter(parse_numbers(clean_prediction(prediction))), None)
    if pred is None:
        return 0.0
    return 1.0 if numbers_match(gold, pred, exact=integer) else 0.0


# ------------------------------------------------------------------------- strings
_NUMBER_WITH_UNIT = re.compile(r"^[$\u20ac\u00a3\u00a5]?\d[\d,.]*\s?[A-Za-z%]+$")
_MONTH_NAME = r"(?P<mon>" + "|".join(_MONTHS) + r")[a-z]*\.?"
_DATE_FORMS = (
    re.compile(r"\b(?P<y>\d{4})[-/.](?P<m>\d{1,2})(?:[-/.](?P<d>\d{1,2}))?\b"),
    re.compile(r"\b(?:(?P<d>\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?)?" + _MONTH_NAME
               + r"(?:\s+(?P<d2>\d{1,2})(?:st|nd|rd|th)?)?,?\s+(?P<y>\d{4})\b", re.IGNORECASE),
)


def find_date(text: str) -> Optional[tuple[int, int, Optional[int]]]:
    """(year, month, day) of the first unambiguous date in ``text`` (ISO or with a month name)."""
    for form in _DATE_FORMS:
        match = form.search(str(text))
        if not match:
            continue
        groups = match.groupdict()
        if groups.get("mon"):
            month = _MONTHS.index(groups["mon"].lower()[:3]) + 1
        else:
            month = int(groups["m"])
        day = groups.get("d") or groups.get("d2")
        if 1 <= month <= 12:
            return int(groups["y"]), month, int(day) if day else None
    return None


def needs_exact_match(gold: str) -> bool:
    """URLs, e-mails, dates and identifiers: near-misses are wrong, so no partial credit."""
    text = str(gold).strip()
    if _EMAIL.match(text) or _URL.match(text) or _DATE.match(text):
        return True
    if len(text.split()) == 1 and re.search(r"\d", text) and re.search(r"[A-Za-z]", text):
        return not _NUMBER_WITH_UNIT.match(text)  # "A3-1142b" is a code; "5km" is a number
    return False


def token_f1(gold: str, prediction: str) -> float:
    g, p = normalize_words(gold), normalize_words(prediction)
    if not g or not p:
        return 0.0
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_string(gold: str, prediction: str) -> float:
    gold = str(gold).strip()
    pred = clean_prediction(prediction)
    if not pred:
        return 0.0
    if needs_exact_match(gold):
        if _normalize_exact(gold) == _normalize_exact(pred):
            return 1.0
        gold_date = find_date(gold) if _DATE.match(gold) else None
        if gold_date is not None:  # the same date written another way, possibly inside a short sentence
            return 1.0 if find_date(pred) == gold_date and len(pred) <= 4 * len(gold) + 20 else 0.0
        return 0.0
    number = parse_plain_number(gold)
    if number is not None:
        return score_number(number, pred, integer=_is_integral(number))
    return token_f1(gold, pred)


# ------------------------------------------------------------------------- lists
def parse_list(value: Any) -> list[str]:
    """Items of a gold or predicted list: a JSON/Python list literal, else split on ; , newlines
    and a final "and"."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = clean_prediction(value)
    if text.startswith("[") and text.endswith("]"):
        for loader in (json.loads, ast.literal_eval):
            try:
                parsed = loader(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, (list, tuple)):
                return [str(v).strip() for v in parsed if str(v).strip()]
        text = text[1:-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        items = [re.sub(r"^(?:[-*•]|\d+[.)])\s*", "", ln) for ln in lines]
    else:
        # commas split items, except thousands separators ("1,234")
        items = text.split(";") if ";" in text else re.split(r",(?!\d{3}(?!\d))", text)
        if len(items) >= 2:  # "A, B and C": the last "and" separates items too
            last = re.split(r"\s+and\s+", items[-1].strip())
            if len(last) == 2 and all(last):
                items = items[:-1] + last
    return [i.strip().strip("\"'`").strip() for i in items if i.strip().strip("\"'`").strip()]


def score_item(gold: str, prediction: str) -> float:
    gold_number = parse_plain_number(gold)
    if gold_number is not None:
        pred_number = parse_plain_number(prediction)
        if pred_number is None:
            return 0.0
        return 1.0 if numbers_match(gold_number, pred_number, exact=_is_integral(gold_number)) else 0.0
    return score_string(gold, prediction)


def list_f1(gold_items: Sequence[str], pred_items: Sequence[str]) -> float:
    """F1 with a soft match count: greedy one-to-one pairing by item score, best pairs first."""
    if not gold_items or not pred_items:
        return 0.0
    pairs = sorted(((score_item(g, p), gi, pi) for gi, g in enumerate(gold_items) for pi, p in enumerate(pred_items)),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_g, used_p, matched = set(), set(), 0.0
    for s, gi, pi in pairs:
        if s <= 0 or gi in used_g or pi in used_p:
            continue
        used_g.add(gi)
        used_p.add(pi)
        matched += s
    if matched == 0:
        return 0.0
    precision, recall = matched / len(pred_items), matched / len(gold_items)
    return 2 * precision * recall / (precision + recall)


def f1_from_counts(gold_count: int, answer_count: int, covered: int) -> float:
    """List F1 from item counts (what the LLM judge reports)."""
    if gold_count <= 0 or answer_count <= 0 or covered <= 0:
        return 0.0
    covered = min(covered, gold_count, answer_count)
    precision, recall = covered / answer_count, covered / gold_count
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------- entry point
_FORMAT_ALIASES = {"str": "String", "string": "String", "int": "Integer", "integer": "Integer",
                   "float": "Float", "list": "List", "none": "None", "null": "None", "": "String"}


def normalize_format(answer_format: Optional[str]) -> str:
    """MMLongBench's Str/Int/Float/List/None and our String/Integer/... spellings -> ours."""
    key = str(answer_format if answer_format is not None else "None").strip().lower()
    if key not in _FORMAT_ALIASES:
        raise ValueError(f"unknown answer_format {answer_format!r}; expected one of "
                         "String, Integer, Float, List, None (or Str, Int)")
    return _FORMAT_ALIASES[key]


def score_answer(prediction: Any, answer: Any, answer_format: Optional[str]) -> float:
    """Rule-based score in [0, 1] of one prediction against the gold answer and its format."""
    pred = clean_prediction(prediction)
    if not pred:
        return 0.0
    fmt = normalize_format(answer_format)
    if gold_is_not_answerable(answer, fmt):
        return 1.0 if is_not_answerable(pred) else 0.0
    if fmt == "List" or isinstance(answer, (list, tuple)):
        return list_f1(parse_list(answer), parse_list(pred))
    if fmt in ("Integer", "Float"):
        number = parse_plain_number(str(answer))
        if number is None:
            return score_string(str(answer), pred)
        return score_number(number, pred, integer=(fmt == "Integer" and _is_integral(number)))
    return score_string(str(answer), pred)


__all__ = [
    "NOT_ANSWERABLE",
    "clean_prediction",
    "find_date",
    "normalize_format",
    "f1_from_counts",
    "gold_is_not_answerable",
    "is_not_answerable",
    "list_f1",
    "parse_list",
    "parse_numbers",
    "parse_plain_number",
    "score_answer",
    "score_string",
    "token_f1",
]
