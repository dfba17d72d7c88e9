"""``--judge mmlb-rules``: MMLongBench's official rule-based docqa score, and its record selection.

Every expected score below was worked out by hand from the official code's rules
(EdinburghNLP/MMLongBench ``utils.py: parse_output, eval_docqa_score`` and its helpers), not by
running the code under test. The arithmetic is in the comment next to each case that is not 0 or 1.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_vlm.eval.data import DataConfig, load_data, official_selection, parse_max_test_samples
from megatron_vlm.eval.judge import AutoRuleScorer, MMLBRuleScorer, RuleScorer, make_scorer, score_records
from megatron_vlm.eval.mmlb_rules import (clean_docqa_string, merge_list_gold, needs_exact_match, numbers_in,
                                          parse_answer, score_mmlb, string_type)

# (model output, gold, answer_format, expected official score)
CASES = [
    # --- output parsing: the text after the first "Answer:" (any case), one repeated prefix dropped
    ("Answer: 42", "42", "Integer", 1.0),
    ("The document lists 7 tables.\nAnswer: 12", "7", "Integer", 0.0),  # the 7 before "Answer:" is cut off
    ("answer: answer: Paris", "Paris", "String", 1.0),
    ("Final answer: Paris", "Paris", "String", 1.0),  # "answer:" inside a phrase counts
    ("**Answer:** Paris", "Paris", "String", 1.0),  # "** paris": the asterisks are punctuation, deleted
    ("Paris is the answer", "Paris", "String", 0.5),  # no prefix: [paris, is, answer] vs [paris]: P 1/3 R 1
    ("My answer: 5. Answer: 6", "6", "Integer", 1.0),  # after the FIRST prefix: "5. Answer: 6" holds 6
    ("Answer:", "Paris", "String", 0.0),
    # --- Integer: any whole number anywhere in the prediction
    ("There are 3 figures and 12 tables.", "12", "Integer", 1.0),
    ("3 figures", "12", "Integer", 0.0),
    ("12.0", "12", "Integer", 1.0),
    ("12.5", "12", "Integer", 0.0),  # not whole: ignored
    ("1,200 people", "1200", "Integer", 1.0),  # commas deleted
    ("1200", "1,200", "Integer", 1.0),
    ("5", "5 kg", "Integer", 1.0),  # unit suffix cut from the gold
    ("$5", "5", "Integer", 1.0),
    ("2019-2020", "2020", "Integer", 0.0),  # the hyphen makes it -2020
    ("2019-2020", "2019", "Integer", 1.0),
    ("5 million", "5000000", "Integer", 0.0),  # scale words are not applied
    ("5000000", "5 million", "Integer", 0.0),  # the gold's "million" is cut: the gold is 5
    ("about 5 million", "5 million", "Integer", 1.0),
    ("Seven", "7", "Integer", 0.0),
    # --- Float: any number within 1% (relative) of gold, gold/100 or gold*100
    ("0.25", "25%", "Float", 1.0),  # gold 25 -> 0.25 is gold/100
    ("25%", "0.25", "Float", 1.0),  # prediction 25 = gold*100
    ("3.52", "3.5", "Float", 1.0),  # |0.02| <= 0.01 * 3.52
    ("3.6", "3.5", "Float", 0.0),  # |0.1| > 0.036
    ("between 2.1 and 3.5", "3.5", "Float", 1.0),
    ("0", "0.0", "Float", 1.0),
    ("0.001", "0", "Float", 0.0),  # relative tolerance only
    ("$1.5", "1.5 million", "Float", 1.0),
    ("-3.5", "-3.5", "Float", 1.0),
    ("3.5", "-3.5", "Float", 0.0),
    ("12.5%", "12.5", "Float", 1.0),
    # --- exact-match golds: case-sensitive substring of the prediction
    ("See https://example.com/report for details", "https://example.com/report", "String", 1.0),
    ("HTTPS://EXAMPLE.COM/REPORT", "https://example.com/report", "String", 0.0),
    ("example.com/report", "https://example.com/report", "String", 0.0),
    ("It is on page 5.", "page 5", "String", 1.0),
    ("Page 5", "page 5", "String", 0.0),
    ("page 15", "page 5", "String", 0.0),
    ("page 5 and page 6", "page 5", "String", 1.0),
    ("page 5", "Page 5", "String", 1.0),  # "Page" is not "^page": token F1, [page, 5] both sides
    ("Page 15", "Page 5", "String", 0.5),  # F1: [page, 15] vs [page, 5]: P 1/2 R 1/2
    ("10:00 a.m.", "10:00 a.m.", "String", 1.0),
    ("10:00 AM", "10:00 a.m.", "String", 0.0),
    ("10:00 A.M.", "10:00 a.m.", "String", 0.0),
    ("Contact info@acme.org.", "info@acme.org", "String", 1.0),
    ("INFO@ACME.ORG", "info@acme.org", "String", 0.0),
    ("It was founded in 12019", "2019", "String", 1.0),  # digits: substring, so 2019 is in 12019
    ("2021-05-03", "2021-05-03", "String", 1.0),
    ("May 3, 2021", "2021-05-03", "String", 0.0),
    ("pages 3-5", "3-5", "String", 1.0),
    ("3 to 5", "3-5", "String", 0.0),
    ("run main.py", "main.py", "String", 1.0),
    ("MAIN.PY", "main.py", "String", 0.0),
    # --- "Not answerable": token F1 against that string, like any other string
    ("Not answerable", "Not answerable", "None", 1.0),
    ("not answerable.", "Not answerable", "None", 1.0),
    ("The question is not answerable.", "Not answerable", "None", 2 / 3),  # [question is not answerable]: P 1/2 R 1
    ("Unanswerable", "Not answerable", "None", 0.0),
    ("The document does not mention it.", "Not answerable", "None", 2 / 7),  # P 1/5 R 1/2 -> 0.2/0.7
    ("Not answerable", "Not answerable", "String", 1.0),
    ("Paris", "Not answerable", "None", 0.0),
    # --- token F1 deletes ASCII punctuation (does not split on it); articles dropped
    ("state-of-the-art", "state of the art", "String", 0.0),  # "stateoftheart" vs [state, of, art]
    ("U.S.A.", "USA", "String", 1.0),
    ("U.S. Army", "US Army", "String", 1.0),
    ("the company's CEO", "company CEO", "String", 0.5),  # [companys, ceo] vs [company, ceo]
    ("CEO\u2014Jane", "CEO Jane", "String", 0.0),  # an em dash is not ASCII punctuation: one token
    ("Apple, Inc.", "Apple Inc", "String", 1.0),
    ("A cat", "the cat", "String", 1.0),
    # --- lists: string items merged into one F1 item, numbers / exact-match items scored alone
    ("13 and 14", '["13", "14"]', "List", 1.0),
    ("13", '["13", "14"]', "List", 0.5),
    ("Figures 13, 14 and 15", '["13", "14"]', "List", 1.0),  # no precision penalty for extra numbers
    ("1314", '["13", "14"]', "List", 0.0),
    ("red and blue", '["red", "blue", "green"]', "List", 2 / 3),  # "red blue green" vs [red and blue]: P 2/3 R 2/3
    ("Green, blue, red", '["red", "blue", "green"]', "List", 1.0),
    # "UK France" vs [uk 3 sites and france] (P 2/5 R 1 -> 4/7); "3" alone -> 1; mean (4/7 + 1) / 2
    ("UK (3 sites) and France", '["UK", "France", "3"]', "List", 11 / 14),
    ("page 5 and Page 6", '["page 5", "page 6"]', "List", 0.5),  # two exact-match items, one found
    ("25% and 0.4", '["25%", "40%"]', "List", 1.0),  # % items are Float: 25 = 25, 0.4 = 40/100
    ("13 and 14.7", "[13, 14.5]", "List", 0.5),  # 13 int -> 1; 14.7 vs 14.5: |0.2| > 0.147 -> 0
    # "Bob Alice" vs [visit httpsaorg or call bob] (P 1/5 R 1/2 -> 2/7); URL item found -> 1; (2/7 + 1) / 2
    ("Visit https://a.org or call Bob", '["https://a.org", "Bob", "Alice"]', "List", 9 / 14),
    ("Answer: 2 and 3", '["2", "3"]', "List", 1.0),
    ("13 and 14", ["13", "14"], "List", 1.0),  # a gold already decoded to a list
]


@pytest.mark.parametrize("output,gold,fmt,expected", CASES)
def test_official_docqa_score(output, gold, fmt, expected):
    score, note = score_mmlb(output, gold, fmt)
    assert note is None
    assert score == pytest.approx(expected, abs=1e-9)


def test_case_count_covers_every_format():
    assert len(CASES) >= 60
    assert {fmt for _, _, fmt, _ in CASES} == {"Integer", "Float", "String", "None", "List"}


def test_parse_answer():
    assert parse_answer("ANSWER:  x ") == "x"
    assert parse_answer("no prefix\n") == "no prefix"
    assert parse_answer("Answer: Answer: Answer: y") == "Answer: y"  # only one repeated prefix is removed
    assert parse_answer("Reasoning...\nanswer: 5\nmore") == "5\nmore"  # everything after the prefix
    assert parse_answer(None) == ""


def test_helpers():
    assert clean_docqa_string("program") == "progra"  # the "m" suffix is cut like a unit
    assert clean_docqa_string("$5 million") == "5"
    assert clean_docqa_string("'12'") == "12"
    assert clean_docqa_string("3 km") == "3 k"
    assert numbers_in("2019-2020") == [2019.0, -2020.0]
    assert numbers_in("1,234.5 and .5") == [1234.5, 0.5]
    assert numbers_in("v1.2.3") == [1.2, 0.3]
    assert string_type("5%") == "Float" and string_type("12") == "Integer" and string_type("1.5") == "Float"
    assert string_type("3 km") == "String" and string_type("inf") == "String" and string_type("$1,200") == "Integer"
    assert needs_exact_match("page 3") and not needs_exact_match("Page 3") and needs_exact_match("3 4")
    assert merge_list_gold(["UK", "3", "France", "page 2"]) == ["UK France", "3", "page 2"]
    assert merge_list_gold(["3", "4"]) == ["3", "4"]


def test_where_the_official_code_would_fail():
    # a Python-literal list is not JSON (json.loads raises): read as a list, and say so
    score, note = score_mmlb("red", "['red', 'blue']", "List")
    assert score == pytest.approx(2 / 3) and "would fail" in note  # "red blue" vs [red]: P 1 R 1/2
    # a number gold that is not a number: scored as a string (token F1 here)
    score, note = score_mmlb("about three", "three", "Integer")
    assert score == pytest.approx(2 / 3) and note  # [about three] vs [three]: P 1/2 R 1


def test_scorers_and_default_dispatch():
    record = {"question": "q", "answer": "Not answerable", "answer_format": "None",
              "prediction": "The question is not answerable.", "task": "docqa"}
    assert MMLBRuleScorer().score("q", "Not answerable", "None", record["prediction"]).score == pytest.approx(2 / 3)
    assert RuleScorer().score("q", "Not answerable", "None", record["prediction"]).score == 1.0
    assert isinstance(make_scorer(None), AutoRuleScorer) and isinstance(make_scorer("mmlb-rules"), MMLBRuleScorer)
    assert isinstance(make_scorer("rules"), RuleScorer)
    records = [dict(record, dataset="mmlongdoc"), dict(record, dataset="heldout"),
               dict(record, dataset="mine"), dict(record, dataset="slidevqa", task="niah")]
    scored = score_records(records, make_scorer("auto", mmlb_datasets=["mine"]), progress=False)
    assert [r["scored_by"] for r in scored] == ["mmlb-rules", "rules", "mmlb-rules", "rules"]
    assert [r["score"] for r in scored] == pytest.approx([2 / 3, 1.0, 2 / 3, 1.0])
    forced = score_records(records, make_scorer("mmlb-rules"), progress=False)
    assert all(r["scored_by"] == "mmlb-rules" for r in forced)
    empty = MMLBRuleScorer().score("q", "5", "Integer", "Answer:  ")
    assert empty.score == 0.0 and empty.scored_by == "empty"


# ------------------------------------------------------------------------- record selection
def _expected_positions(count: int, n: int, seed: int = 42) -> list[int]:
    """Written independently of the code under test. It mirrors MMLongBench ``data.py`` in
    ``load_doc_qa``: ``data = load_dataset("json", data_files=path)["train"]`` then
    ``data = data.shuffle(seed=args.seed).select(range(min(len(data), max_test_samples)))``, with
    ``arguments.py`` ``--seed`` default 42 and ``configs/docqa_all.yaml`` ``max_test_samples: 100``.
    The shuffle is Hugging Face ``datasets.Dataset.shuffle`` (not Python's ``random``): it draws
    ``np.random.default_rng(seed).permutation(len(data))`` and reorders the rows by it, so
    ``select(range(n))`` keeps rows ``permutation[0..n-1]`` (indices into the file's records)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    return [int(i) for i in order][:min(count, n)]


def test_official_selection_positions():
    assert official_selection(300, 100) == _expected_positions(300, 100)
    assert official_selection(300, 100, seed=7) == _expected_positions(300, 100, seed=7)
    assert sorted(official_selection(40, 100)) == list(range(40))  # fewer records than N: all of them
    assert official_selection(5, None) == [0, 1, 2, 3, 4]
    assert parse_max_test_samples("all") is None and parse_max_test_samples("100") == 100
    with pytest.raises(ValueError):
        parse_max_test_samples("0")


def _write_mmlb(tmp_path, count: int = 300):
    images = tmp_path / "mmlb_image"
    docs = [f"doc{d:02d}" for d in range(12)]
    for doc in docs:
        for p in (1, 2):
            path = images / "documentQA" / doc / f"{doc}_page{p}.png"
            os.makedirs(path.parent, exist_ok=True)
            Image.new("RGB", (56, 56), "white").save(path)
    ids = [f"rec{i:03d}" for i in range(count)]

    def record(rid: str) -> dict:
        doc = docs[int(rid[3:]) % len(docs)]
        return {"id": rid, "doc_name": f"{doc}.pdf", "question": f"question {rid}?", "answer": "1",
                "answer_format": "Int", "ans_page_list": [0],
                "page_list": [f"documentQA/{doc}/{doc}_page{p}.png" for p in (1, 2)]}

    data = tmp_path / "mmlb_data"
    data.mkdir()
    k8_ids, k16_ids = ids, list(reversed(ids))  # the two files list the records in different orders
    (data / "mmlongdoc_K8.jsonl").write_text("".join(json.dumps(record(r)) + "\n" for r in k8_ids))
    (data / "mmlongdoc_K16.jsonl").write_text("".join(json.dumps(record(r)) + "\n" for r in k16_ids))
    return data, images, k8_ids, k16_ids


def test_reader_selects_per_file_as_the_official_loader(tmp_path):
    data, images, k8_ids, k16_ids = _write_mmlb(tmp_path)
    (s,) = load_data(f"mmlb:{data},images={images}", DataConfig(max_test_samples=100))
    at8 = {k8_ids[p] for p in _expected_positions(len(k8_ids), 100)}
    at16 = {k16_ids[p] for p in _expected_positions(len(k16_ids), 100)}
    assert len(at8) == len(at16) == 100 and at8 != at16
    assert {e.id for e in s.examples} == at8 | at16
    for e in s.examples:
        assert set(e.published) == {L for L, chosen in ((8192, at8), (16384, at16)) if e.id in chosen}
        assert e.evaluated_at(8192) == (e.id in at8) and e.evaluated_at(16384) == (e.id in at16)
        assert e.evaluated_at(4096) == (e.id in at8)  # no file: the shortest file's choice
        assert e.evaluated_at(65536) == (e.id in at16)  # no file: the longest file below
    assert len(s.negatives) == 12  # unchosen records still add their pages to the documents
    (everything,) = load_data(f"mmlb:{data},images={images}", DataConfig(max_test_samples=None))
    assert len(everything.examples) == 300 and all(e.evaluated_at(8192) for e in everything.examples)
