"""Rule-based scorer: hand-written cases for every answer format, with the expected score worked
out by hand (token F1 = 2PR/(P+R) over lower-cased words without punctuation and articles)."""

from __future__ import annotations

import pytest

from megatron_vlm.eval.scoring import (clean_prediction, f1_from_counts, find_date, normalize_format, parse_list,
                                       score_answer)

CASES = [
    # (prediction, gold, answer_format, expected score, why)
    # --- Integer: exact, x100 / /100 allowed, first number decides
    ("3", "3", "Integer", 1.0, "plain"),
    ("3 pages", "3", "Int", 1.0, "unit word after the number"),
    ("There are 3 figures in the report.", "3", "Integer", 1.0, "number inside a sentence"),
    ("4", "3", "Integer", 0.0, "wrong count"),
    ("101", "100", "Integer", 0.0, "integers are exact, not within 1%"),
    ("1,234", "1234", "Integer", 1.0, "thousands separator"),
    ("45%", "45", "Integer", 1.0, "percent sign on an integer gold"),
    ("0.45", "45", "Integer", 1.0, "/100 (fraction for a percentage gold)"),
    ("Pages 2 and 3", "3", "Integer", 0.0, "the first number decides, not any number"),
    ("three", "3", "Integer", 0.0, "number words are not parsed"),
    # --- Float: within 1%, percent vs fraction both ways
    ("0.25", "25%", "Float", 1.0, "fraction for a percent gold (x100)"),
    ("25%", "0.25", "Float", 1.0, "percent for a fraction gold (/100)"),
    ("12.1", "12", "Float", 1.0, "0.83% off: within 1%"),
    ("12.13", "12", "Float", 0.0, "1.08% off: outside 1%"),
    ("$5.3 million", "5.3", "Float", 1.0, "currency and scale word: the bare value matches"),
    ("5,300,000", "5.3 million", "Float", 1.0, "scaled gold: 5.3 million = 5,300,000"),
    ("5.3M", "$5.3 million", "String", 1.0, "numeric String gold: M suffix"),
    ("-2.5", "-2.5", "Float", 1.0, "negative"),
    ("2.5", "-2.5", "Float", 0.0, "sign matters"),
    ("14.2 kg", "14.2", "Float", 1.0, "unit"),
    # --- Not answerable
    ("Not answerable", "Not answerable", "None", 1.0, "verbatim"),
    ("The document does not mention the CEO.", "Not answerable", "None", 1.0, "paraphrase"),
    ("It cannot be determined from the pages.", "Not answerable", "None", 1.0, "paraphrase 2"),
    ("Berlin", "Not answerable", "None", 0.0, "an answer where none exists"),
    ("Not answerable", "Berlin", "String", 0.0, "refusing an answerable question"),
    ("Not answerable", "42", "Integer", 0.0, "refusing a numeric question"),
    # --- exact-match strings: URLs, e-mails, dates, identifiers
    ("https://www.example.com/", "example.com", "String", 1.0, "URL: scheme, www and slash ignored"),
    ("example.com/about", "example.com", "String", 0.0, "URL: another page"),
    ("Info@Example.org", "info@example.org", "String", 1.0, "e-mail: case-insensitive"),
    ("info@example.com", "info@example.org", "String", 0.0, "e-mail: one character off is wrong"),
    ("5 March 2019", "March 5, 2019", "String", 1.0, "same date, other format"),
    ("2019-03-05", "March 5, 2019", "String", 1.0, "ISO date"),
    ("March 6, 2019", "March 5, 2019", "String", 0.0, "a day off"),
    ("A3-1142b", "A3-1142B", "String", 1.0, "identifier: case-insensitive"),
    ("A3-1142c", "A3-1142b", "String", 0.0, "identifier: no partial credit"),
    ("5 km", "5km", "String", 1.0, "number + unit is a number, not an identifier"),
    # --- other strings: token F1
    ("the blue car", "Blue car", "String", 1.0, "article and case ignored"),
    ("blue", "blue car", "String", 2 / 3, "P=1, R=1/2 -> F1=2/3"),
    ("a red and blue car", "blue car", "String", 2 / 3, "words red,and,blue,car: P=2/4, R=1 -> 2/3"),
    ("Answer: **Tokyo**.", "Tokyo", "Str", 1.0, "prefix, markdown and period stripped"),
    ("Paris", "Tokyo", "String", 0.0, "wrong"),
    # --- lists: order-free, F1 of matches
    ("banana, Apple", "['Apple', 'Banana']", "List", 1.0, "order and case do not matter"),
    ("Apple", "['Apple', 'Banana']", "List", 2 / 3, "P=1, R=1/2"),
    ("Apple, Banana, Cherry", "['Apple', 'Banana']", "List", 0.8, "P=2/3, R=1 -> 0.8"),
    ("Apple, Banana and Cherry", "['Apple', 'Banana', 'Cherry']", "List", 1.0, "final 'and' splits"),
    ("- Apple\n- Banana", '["Apple", "Banana"]', "List", 1.0, "bullet lines, JSON gold"),
    ("['1,234', '5']", "['5', '1234']", "List", 1.0, "numbers inside lists, separators"),
    ("Cherry", "['Apple', 'Banana']", "List", 0.0, "no overlap"),
    ("Not answerable", "Not answerable", "List", 1.0, "unanswerable list question"),
    # --- empty output scores 0 in every format
    ("", "3", "Integer", 0.0, "empty"),
    ("   ", "Not answerable", "None", 0.0, "blank, even for an unanswerable gold"),
    ("Answer:", "Tokyo", "String", 0.0, "only the prefix"),
    (None, "['a']", "List", 0.0, "None prediction"),
]


@pytest.mark.parametrize("prediction,gold,fmt,expected,why", CASES, ids=[c[4] for c in CASES])
def test_rule_scores(prediction, gold, fmt, expected, why):
    assert score_answer(prediction, gold, fmt) == pytest.approx(expected, abs=1e-9), why


def test_helpers():
    assert clean_prediction("Answer: 'Tokyo'.") == "Tokyo"
    assert parse_list("['a', 'b']") == ["a", "b"]
    assert parse_list("x; y, z") == ["x", "y, z"]  # ';' wins over ','
    assert find_date("published on 1st of March 2020") == (2020, 3, 1)
    assert normalize_format("Str") == "String" and normalize_format("Int") == "Integer"
    assert normalize_format(None) == "None"
    with pytest.raises(ValueError, match="unknown answer_format"):
        normalize_format("Bool")
    # list F1 from judge counts: 3 answered, 2 covered, 2 gold -> P 2/3, R 1 -> 0.8
    assert f1_from_counts(2, 3, 2) == pytest.approx(0.8)
    assert f1_from_counts(2, 0, 0) == 0.0 and f1_from_counts(2, 1, 5) == pytest.approx(2 * 1 * 0.5 / 1.5)
