"""MMLongBench's rule-based document-QA score, reproduced behaviour for behaviour (``--judge mmlb-rules``).

Reference: github.com/EdinburghNLP/MMLongBench. The docqa rule score is computed by
``data.py: load_doc_qa -> docqa_post_process``, which parses the model output with
``utils.py: parse_output(prefix="Answer:")`` and scores it with
``utils.py: calculate_metrics(..., "doc_qa") -> eval_docqa_score(gt, pred, answer_format)``.
The helpers mirrored here (our code, same behaviour):

==============================  ===================================
official (utils.py)             here
==============================  ===================================
parse_output                    :func:`parse_answer`
normalize_answer / f1_score     :func:`normalize_tokens`, :func:`token_f1`
get_docqa_clean_string          :func:`clean_docqa_string`
extract_number_list             :func:`numbers_in`
is_float_equal                  :func:`float_matches`
need_exact_match_check          :func:`needs_exact_match`
get_str_type                    :func:`string_type`
eval_docqa_score                :func:`docqa_score`
==============================  ===================================

What the official metric does (and our ``rules`` scorer does not):

* Integer/Float golds match if **any** number anywhere in the prediction matches (Float: within
  1% relative, also against gold/100 and gold*100).
* String and "None" (Not answerable) golds: if the gold looks like something that must be exact
  (a URL with ``https://``, ``*.py``, a gold starting with lower-case ``page``, digits or a digit
  range, a.m./p.m., numeric dates, an e-mail) the score is 1 when the gold is a **case-sensitive
  substring** of the prediction; otherwise SQuAD token F1 (lower case, ASCII punctuation
  **deleted**, articles removed). "Not answerable" is just a string scored by F1.
* Lists: the gold's plain-string items are **merged into one string** (scored by F1 against the
  whole prediction); every other item (numbers, exact-match strings) is scored alone against the
  whole prediction; the score is the mean over the merged list.

Quirks kept on purpose (each is marked ``QUIRK`` below). Where the official code would raise
(a List gold that is not JSON, a number gold that is not a number), :func:`docqa_score` raises
:class:`OfficialCodeWouldFail`; :func:`score_mmlb` then scores the gold as a string and says so.
"""

from __future__ import annotations

import ast
import json
import math
import re
import string
from collections import Counter
from typing import Any, Optional

ANSWER_PREFIX = "Answer:"
# Python's string.punctuation (ASCII only): what the official normaliser deletes. "’", "–", "…" stay.
_ASCII_PUNCT = frozenset(string.punctuation)
# The official unit/scale suffixes, tried in this order, each removed once if the string ends with it.
_SUFFIXES = ("kg", "meters", "acres", "minutes", "miles", "mile", "feet", "million", "thousand", "billion", "mm", "m")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d*)?|-?\.\d+")
_EXACT_PATTERNS = tuple(re.compile(p) for p in (
    r"https://",
    r".*\.(py|ipynb)$",
    r"^page",                                   # QUIRK: lower case only; "Page 3" is scored by F1
    r"^\d+(-\d+|\s\d+)?$",
    r"(a\.m\.|p\.m\.)",
    r"^\d{4}[-/\s]\d{1,2}[-/\s]\d{1,2}$",
    r"^\d{1,2}[-/\s]\d{1,2}[-/\s]\d{2,4}$",
    r"^\d{4}[-/\s]\d{1,2}$",
    r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$",
))
FORMATS = ("Integer", "Float", "String", "None", "List")


class OfficialCodeWouldFail(ValueError):
    """The official scorer raises on this gold (e.g. a List gold that is not JSON)."""


# ------------------------------------------------------------------------- output parsing
def parse_answer(output: Any, prefix: str = ANSWER_PREFIX) -> str:
    """The text after the first ``prefix`` (case-insensitive), else the whole output; stripped, and
    with one more leading ``prefix`` removed (models sometimes repeat it).

    QUIRK (official): the first occurrence wins, even inside a word or a sentence ("my answer:
    ..."), and whatever follows it is kept whole (markdown such as ``**`` after "Answer:" stays).
    """
    text = "" if output is None else str(output)
    found = re.search(re.escape(prefix), text, flags=re.IGNORECASE)
    rest = (text[found.end():] if found else text).strip()
    return re.sub("^" + re.escape(prefix), "", rest, flags=re.IGNORECASE).strip()


# ------------------------------------------------------------------------- token F1
def normalize_tokens(text: str) -> list[str]:
    """Lower case, ASCII punctuation deleted (not replaced by a space: "a.m." -> "am",
    "state-of-the-art" -> "stateoftheart"), then the words a/an/the removed."""
    text = "".join(ch for ch in str(text).lower() if ch not in _ASCII_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD-style token F1 of the prediction against the gold (0 when nothing is shared)."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(gold)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------- numbers
def clean_docqa_string(value: Any) -> str:
    """The official cleaning before reading a number: lower case, commas deleted, unit/scale
    suffixes cut from the end, one quote at each end and any $, £, % at the ends removed.

    QUIRK: the suffixes are cut as plain letters, so "3 km" -> "3 k", "program" -> "progra",
    and "5 million" -> "5" (the scale is dropped, not applied)."""
    s = str(value).lower().strip().replace(",", "")
    for suffix in _SUFFIXES:
        s = re.sub(re.escape(suffix) + r"$", "", s).strip()
    s = re.sub(r"^['\"]|['\"]$", "", s).strip()
    for symbol in ("$", "£", "%"):
        s = s.strip().strip(symbol).strip()
    return s


def numbers_in(text: str) -> list[float]:
    """Every number in ``text`` (commas deleted first), as floats, infinities skipped.

    QUIRK: a hyphen before digits is a minus sign, so "2019-2020" gives 2019 and -2020 and a
    range "10-15" gives 10 and -15."""
    out = []
    for raw in _NUMBER_RE.findall(str(text).replace(",", "")):
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isfinite(value):
            out.append(value)
    return out


def float_matches(gold: float, pred: float, include_percentage: bool = False) -> bool:
    """``pred`` within 1% (relative, no absolute tolerance) of the gold, or of gold/100 or gold*100."""
    targets = (gold / 100, gold, gold * 100) if include_percentage else (gold,)
    return any(math.isclose(t, pred, rel_tol=0.01) for t in targets)


def needs_exact_match(gold: str) -> bool:
    """Golds that must appear verbatim in the prediction (see the module docstring)."""
    return any(p.search(gold) for p in _EXACT_PATTERNS)


def string_type(item: str) -> str:
    """"Integer", "Float" or "String": what a string list item is scored as.

    A number after :func:`clean_docqa_string` is Integer when whole and the raw item has no "%",
    else Float; anything Python's ``float`` rejects (and inf/nan) is String."""
    try:
        number = float(clean_docqa_string(item))
        whole = number == int(number)
    except (ValueError, OverflowError, TypeError):
        return "String"
    return "Integer" if whole and "%" not in str(item) else "Float"


def _gold_number(gold: Any) -> float:
    try:
        return float(clean_docqa_string(str(gold)))
    except ValueError:
        raise OfficialCodeWouldFail(f"gold {gold!r} is not a number after cleaning") from None


# ------------------------------------------------------------------------- the score
def _load_list(gold: Any) -> list:
    if isinstance(gold, (list, tuple)):
        return list(gold)
    try:
        value = json.loads(gold)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, list):
        raise OfficialCodeWouldFail(f"List gold {gold!r} is not a JSON list")
    return value


def merge_list_gold(items: list) -> list:
    """The official list regrouping: all string items that are neither numbers nor exact-match
    golds are joined with spaces into one item, placed first; the other items follow in order."""
    merged_flags = [isinstance(i, str) and string_type(i) == "String" and not needs_exact_match(i) for i in items]
    merged = " ".join(i for i, m in zip(items, merged_flags) if m).strip()
    if not merged:
        return list(items)
    return [merged] + [i for i, m in zip(items, merged_flags) if not m]


def docqa_score(gold: Any, prediction: str, answer_format: str) -> float:
    """The official docqa rule score of an already parsed prediction (see :func:`parse_answer`)."""
    if answer_format == "Integer":
        value = _gold_number(gold)
        if value != int(value):
            raise OfficialCodeWouldFail(f"Integer gold {gold!r} is not a whole number")  # official: assert
        target = int(value)
        pred_numbers = [int(n) for n in numbers_in(clean_docqa_string(str(prediction))) if int(n) == n]
        return float(any(n == target for n in pred_numbers))
    if answer_format == "Float":
        value = _gold_number(gold)
        return float(any(float_matches(value, n, include_percentage=True)
                         for n in numbers_in(clean_docqa_string(str(prediction)))))
    if answer_format in ("String", "None"):
        if not isinstance(gold, str):
            raise OfficialCodeWouldFail(f"{answer_format} gold {gold!r} is not a string")
        if needs_exact_match(gold):
            return float(gold in prediction)  # QUIRK: case-sensitive substring ("2019" is in "12019")
        return token_f1(prediction, gold)
    if answer_format == "List":
        items = merge_list_gold(_load_list(gold))
        if not items:
            raise OfficialCodeWouldFail("empty List gold")  # official: division by zero
        scores = []
        for item in items:
            if isinstance(item, list):
                raise OfficialCodeWouldFail("nested list in a List gold")  # official: assert
            if isinstance(item, int):  # QUIRK (Python): JSON true/false are ints too
                kind = "Integer"
            elif isinstance(item, float):
                kind = "Float"
            else:
                kind = string_type(item)
            scores.append(docqa_score(item, prediction, kind))
        return sum(scores) / len(items)
    raise OfficialCodeWouldFail(f"unknown answer_format {answer_format!r}")


def score_mmlb(output: Any, gold: Any, answer_format: str) -> tuple[float, Optional[str]]:
    """(score, note) of a raw model output: parsed after "Answer:" then scored officially.

    ``note`` is None normally; where the official code would raise, the gold is scored as a
    String (its text, exact-match or F1 rules) and ``note`` says why."""
    prediction = parse_answer(output)
    try:
        return docqa_score(gold, prediction, answer_format), None
    except OfficialCodeWouldFail as err:
        text = gold if isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
        if answer_format == "List" and isinstance(gold, str):
            try:  # a Python-literal list ("['a', 'b']"): read it as the official JSON would have been
                value = ast.literal_eval(gold)
                if isinstance(value, list) and value:
                    return docqa_score(value, prediction, "List"), f"official code would fail: {err}"
            except (ValueError, SyntaxError, OfficialCodeWouldFail):
                pass
        return docqa_score(text, prediction, "String"), f"official code would fail: {err}"


__all__ = [
    "ANSWER_PREFIX",
    "FORMATS",
    "OfficialCodeWouldFail",
    "clean_docqa_string",
    "docqa_score",
    "float_matches",
    "merge_list_gold",
    "needs_exact_match",
    "normalize_tokens",
    "numbers_in",
    "parse_answer",
    "score_mmlb",
    "string_type",
    "token_f1",
]
