"""MMLongBench-Doc's original release (samples.json + documents/*.pdf) read as released: evidence
pages parsed from their string, 1-based, landing on the rendering of that PDF page; every bad record
named by file:line and doc_id with its reason; pages rendered once (144 DPI, the pool's renderer)
and reused; an all-bad file is an error."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megatron_vlm.data.image_processing import image_token_count
from megatron_vlm.data.tokenizer import load_tokenizer
from megatron_vlm.eval.build import instantiate
from megatron_vlm.eval.data import DataConfig, DataError, load_data
from megatron_vlm.eval.mmlb_doc import parse_evidence_pages, parse_evidence_sources
from megatron_vlm.eval.prompt import PromptConfig, TokenCounter
from megatron_vlm.pool import pdf as pdfmod
from megatron_vlm.pool.synthetic_pdfs import write_not_a_pdf, write_page_sizes_pdf

# page widths differ, so a rendered image tells which PDF page it is (144 DPI: 2 pixels per point)
A_PAGES = [(100, 140), (110, 140), (120, 140), (130, 140)]
B_PAGES = [(90, 120), (90, 130), (90, 140)]


def release_record(doc_id, evidence, answer="8", fmt="Int", sources="['Chart']", **extra):
    record = {"doc_id": doc_id, "doc_type": "Research report / Introduction", "question": f"Question on {doc_id}?",
              "answer": answer, "evidence_pages": evidence, "evidence_sources": sources, "answer_format": fmt}
    record.update(extra)
    return record


def write_release(root, records) -> str:
    docs = root / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    write_page_sizes_pdf(str(docs / "Report-A.pdf"), A_PAGES)
    write_page_sizes_pdf(str(docs / "b.pdf"), B_PAGES)
    write_not_a_pdf(str(docs / "broken.pdf"))
    (root / "samples.json").write_text(json.dumps(records, indent=4))  # the release's layout
    return str(root)


GOOD = [release_record("Report-A.pdf", "[2, 4]"),
        release_record("b.pdf", "[]", answer="Not answerable", fmt="None", sources="[]")]
BAD = [(release_record("Report-A.pdf", "[0]"), "evidence_page_out_of_range"),
       (release_record("Report-A.pdf", "[5]"), "evidence_page_out_of_range"),
       (release_record("b.pdf", "[2"), "bad_evidence_pages"),
       (release_record("b.pdf", "[2, 'x']"), "bad_evidence_pages"),
       (release_record("missing.pdf", "[1]"), "missing_document"),
       (release_record("broken.pdf", "[1]"), "pdf_corrupt"),
       ({"doc_id": "b.pdf", "question": "no answer"}, "bad_record"),
       (release_record("b.pdf", "[1]", fmt="Bool"), "bad_answer_format"),
       (release_record("../b.pdf", "[1]"), "bad_record")]


@pytest.fixture(scope="module")
def counter():
    return TokenCounter(load_tokenizer(), PromptConfig())


def test_fields_as_released():
    assert parse_evidence_pages("[3, 5]") == [3, 5] and parse_evidence_pages("[]") == [] and parse_evidence_pages([2]) == [2]
    for bad in ("[3, 5", "3", "[true]", "{'a': 1}", None):
        with pytest.raises((ValueError, TypeError)):
            parse_evidence_pages(bad)
    assert parse_evidence_sources("['Pure-text (Plain-text)', 'Chart']") == ["Pure-text (Plain-text)", "Chart"]
    assert parse_evidence_sources("__import__('os')") == "__import__('os')"  # a literal or nothing: never run


def test_release_reader(tmp_path, counter, monkeypatch):
    records = [GOOD[0]] + [r for r, _ in BAD] + [GOOD[1]]
    release = write_release(tmp_path / "data", records)
    cache = tmp_path / "out" / "cache"
    (s,) = load_data(f"mmlb-doc:{release}", DataConfig(cache_dir=str(cache)))
    assert s.name == "mmlongdoc" and s.info["kind"] == "mmlb" and s.info["records"] == len(records)
    assert [e.id for e in s.examples] == ["mmlongdoc_0", f"mmlongdoc_{len(records) - 1}"]
    first, unanswerable = s.examples
    assert first.evidence_pages == [2, 4] and first.answer == "8" and first.answer_format == "Integer"
    assert first.meta["doc_name"] == "Report-A" and first.meta["evidence_sources"] == ["Chart"]
    assert unanswerable.answer == "Not answerable" and unanswerable.answer_format == "None"
    assert unanswerable.evidence_pages == []
    # 1-based evidence lands on the rendering of that PDF page (widths tell pages apart), at 144 DPI
    doc = first.doc
    assert doc.doc_id == "Report-A" and [p.page for p in doc.pages] == [1, 2, 3, 4]
    for page, (width, height) in zip(doc.pages, A_PAGES):
        assert Image.open(page.image).size == (2 * width, 2 * height)
        assert page.tokens == image_token_count(2 * height, 2 * width)
        assert page.image.endswith(f"/Report-A/Report-A_page{page.page}.png")
    assert Image.open(doc.pages[1].image).size[0] == 2 * A_PAGES[1][0]
    # every bad record named by file:line and doc_id, with its reason
    text = (tmp_path / "data" / "samples.json").read_text().splitlines()
    starts = [n for n, line in enumerate(text, 1) if line == "    {"]
    assert len(starts) == len(records)
    assert sorted((d.reason, d.where) for d in s.dropped) == sorted(
        (reason, f"{tmp_path / 'data' / 'samples.json'}:{starts[i + 1]} (doc_id {record['doc_id']})")
        for i, (record, reason) in enumerate(BAD))
    assert "outside 1..4" in next(d.detail for d in s.dropped if d.reason == "evidence_page_out_of_range")
    assert {d.doc_id for d in s.negatives} == {"Report-A", "b"}
    # contexts: trimmed around the evidence pages, then extended with the other document
    small = instantiate(first, 300, s.negatives, counter)
    assert small.method == "trimmed" and {2, 4} <= set(small.kept_pages) and small.num_tokens <= 300
    big = instantiate(first, 4096, s.negatives, counter)
    assert big.method == "extended" and [a["doc_id"] for a in big.added] == ["b"]
    # rendered once: a second read reuses the cache without rendering
    monkeypatch.setattr(pdfmod, "render_page", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered")))
    (again,) = load_data(f"mmlb-doc:{release}", DataConfig(cache_dir=str(cache)))
    assert [p.image for p in again.examples[0].doc.pages] == [p.image for p in doc.pages]
    # a changed PDF is rendered again
    write_page_sizes_pdf(str(tmp_path / "data" / "documents" / "b.pdf"), B_PAGES[:2])
    with pytest.raises(AssertionError, match="rendered"):
        load_data(f"mmlb-doc:{release}", DataConfig(cache_dir=str(cache)))


def test_all_bad_and_missing_inputs(tmp_path):
    release = write_release(tmp_path / "data", [r for r, _ in BAD])
    with pytest.raises(DataError, match="none of the 9 records") as info:
        load_data(f"mmlb-doc:{release},cache={tmp_path / 'c'}", DataConfig())
    assert "evidence_page_out_of_range" in str(info.value)
    (tmp_path / "data" / "samples.json").write_text('[\n  {"doc_id": "b.pdf"},\n  {"doc_id": oops}\n]')
    with pytest.raises(DataError, match=r"samples.json:3: not valid JSON"):
        load_data(f"mmlb-doc:{release},cache={tmp_path / 'c'}", DataConfig())
    with pytest.raises(DataError, match="cache=DIR"):
        load_data(f"mmlb-doc:{release}", DataConfig())
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"mmlb-doc:{tmp_path / 'nowhere'},cache={tmp_path / 'c'}", DataConfig())
    with pytest.raises(DataError, match="unknown option"):
        load_data(f"mmlb-doc:{release},images={tmp_path}", DataConfig())
