"""Document pool structure: block labels, headers/footers by repetition, sections with page spans,
8-15-page segment sampling, language detection."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

if importlib.util.find_spec("pymupdf") is None:  # without importing it: its add-ons load ONNX
    pytest.skip("PyMuPDF is not installed", allow_module_level=True)

from megatron_vlm.pool import pdf as P  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.pool.language import UNKNOWN, detect_language, sample_text  # noqa: E402
from megatron_vlm.pool.layout import LayoutConfig, label_document, running_blocks  # noqa: E402
from megatron_vlm.pool.sections import (  # noqa: E402
    FRONT_MATTER,
    Heading,
    Section,
    build_sections,
    check_outline,
    document_sections,
    join_lines,
    sample_segment,
    segment_candidates,
)


def _read(path: str):
    limits = P.PdfLimits()
    doc = P.open_pdf(path, limits)
    n = doc.page_count
    pages = [P.read_page(P.load_page(doc, i), limits) for i in range(n)]
    toc = P.read_toc(doc, n, limits)
    return pages, toc, P.metadata_title(doc), n


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = S.write_report_pdf(str(tmp_path_factory.mktemp("layout") / "report.pdf"), S.ReportSpec(seed=1))
    pages, toc, title, n = _read(path)
    return pages, toc, label_document(pages, toc, title), n


def _labels(blocks, label):
    return [b for b in blocks if b.label == label]


def test_every_label_kind_is_found(report):
    pages, toc, labelled, n = report
    seen = {b.label for blocks in labelled for b in blocks}
    assert {"title", "section", "paragraph", "list", "table", "caption", "header", "footer", "figure"} <= seen
    assert [b.text for b in _labels(labelled[0], "title")] == ["Synthetic Technical Report"]


def test_headers_and_footers_on_every_page(report):
    _, _, labelled, n = report
    for p, blocks in enumerate(labelled, start=1):
        assert [b.text for b in _labels(blocks, "header")] == ["ACME Research - Internal Report"], p
        assert [b.text for b in _labels(blocks, "footer")] == [f"Page {p} of {n}"], p
        assert not any("ACME Research" in b.text for b in blocks if b.label not in ("header",))


def test_sections_tables_captions_lists(report):
    _, _, labelled, _ = report
    intro = labelled[1]
    assert [(b.text, b.level) for b in _labels(intro, "section")] == [("1 Introduction", 1)]
    assert len(_labels(intro, "list")) == 1 and _labels(intro, "list")[0].text.startswith("- ")
    methods = labelled[3]
    assert [(b.text, b.level) for b in _labels(methods, "section")] == [("2 Data and Methods", 1),
                                                                          ("2.1 Data Sources", 2)]
    results = labelled[6]
    tables = _labels(results, "table")
    assert len(tables) == 1 and tables[0].rows[0] == ["Region", "Q1", "Q2", "Q3", "Q4"] and len(tables[0].rows) == 6
    assert tables[0].text.splitlines()[0] == "Region | Q1 | Q2 | Q3 | Q4"
    assert [b.text for b in _labels(results, "caption")] == ["Table 1: Quarterly revenue by region (million USD)"]
    # no table cell leaks out as a paragraph
    assert not any("Region A" in b.text for b in results if b.label != "table")
    figure_page = labelled[7]
    assert len(_labels(figure_page, "figure")) == 1
    assert _labels(figure_page, "caption")[0].text.startswith("Figure 1:")
    # the figure sits above its caption in reading order
    order = [b.label for b in figure_page if b.label in ("figure", "caption")]
    assert order == ["figure", "caption"]


EXPECTED_TOP = [("1 Introduction", 2, 3), ("2 Data and Methods", 4, 6), ("3 Results", 7, 9), ("4 Discussion", 10, 11)]
EXPECTED_SUB = [("2.1 Data Sources", 4, 5), ("2.2 Processing", 5, 6)]  # both start mid-page: pages are shared


def _spans(sections, level):
    return [(s.title, s.first_page, s.last_page) for s in sections if s.level == level and s.title[0].isdigit()]


def test_sections_from_outline(report):
    pages, toc, labelled, n = report
    sections = document_sections(toc, labelled, n)
    assert {s.source for s in sections} == {"toc"}
    assert _spans(sections, 1) == EXPECTED_TOP
    assert _spans(sections, 2) == EXPECTED_SUB
    assert sections[0].first_page == 1  # the title page is covered


def test_sections_from_layout_without_outline(tmp_path):
    path = S.write_report_pdf(str(tmp_path / "no_toc.pdf"), S.ReportSpec(seed=1, toc=False))
    pages, toc, title, n = _read(path)
    assert toc == []
    sections = document_sections(toc, label_document(pages, toc, title), n)
    assert {s.source for s in sections} == {"layout"}
    assert _spans(sections, 1) == EXPECTED_TOP
    assert _spans(sections, 2) == EXPECTED_SUB


def _content(number, texts_top_bottom, height=792.0):
    blocks = []
    for text, where in texts_top_bottom:
        y = {"top": 30.0, "bottom": 750.0, "body": 300.0}[where]
        blocks.append(P.TextBlock(bbox=(72.0, y, 300.0, y + 12), lines=[text], size=10.0, bold=0.0))
    return P.PageContent(number=number, width=612.0, height=height, blocks=blocks, source="text")


def test_running_blocks_need_repetition():
    pages = [_content(i, [("Quarterly Report 2024", "top"), (f"- {i} -", "bottom"), ("Body text here.", "body")])
             for i in range(1, 7)]
    note = P.TextBlock(bbox=(72.0, 20.0, 300.0, 40.0), lines=["A one-off note at the top"], size=10.0, bold=0.0)
    pages[2].blocks.append(note)
    found = running_blocks(pages, LayoutConfig())
    labelled = label_document(pages)
    assert (2, 3) not in found  # appears once: not a running header
    assert all((p, 0) in found and (p, 1) in found for p in range(6))
    assert [b.label for b in labelled[0]] == ["header", "footer", "paragraph"]
    assert labelled[2][3].label != "header"


def test_build_sections_spans():
    headings = [Heading("Intro", 1, 2, starts_page=True), Heading("Setup", 2, 3, starts_page=False),
                Heading("Results", 1, 5, starts_page=False), Heading("End", 1, 9, starts_page=True)]
    sections = build_sections(headings, 10, "layout")
    assert [(s.title, s.first_page, s.last_page) for s in sections] == [
        (FRONT_MATTER, 1, 1), ("Intro", 2, 5), ("Setup", 3, 5), ("Results", 5, 8), ("End", 9, 10)]
    assert build_sections([], 4, "layout") == [Section("", 1, 1, 4, "pages")]
    assert build_sections([], 0, "layout") == []
    assert join_lines("2 Creating document environ-\nments") == "2 Creating document environments"


def _doc_sections():
    return [
        Section(FRONT_MATTER, 1, 1, 1, "toc"),
        Section("A", 1, 2, 6, "toc"),
        Section("B", 1, 7, 12, "toc"),
        Section("C", 1, 13, 20, "toc"),
        Section("D", 1, 21, 40, "toc"),  # longer than 15: opened into its subsections
        Section("D.1", 2, 21, 30, "toc"),
        Section("D.2", 2, 31, 40, "toc"),
        Section("E", 1, 41, 70, "toc"),  # long, no subsections: cut into parts
    ]


def test_segment_candidates_are_whole_consecutive_sections():
    sections = _doc_sections()
    candidates = segment_candidates(sections, 70, min_pages=8, max_pages=15)
    assert candidates
    starts = {s.first_page for s in sections} | {56}  # E (30 pages) is cut into 41-55 and 56-70
    ends = {s.last_page for s in sections if s.title != "D" and s.title != "E"} | {55, 70}
    for seg in candidates:
        assert 8 <= seg.num_pages <= 15, seg
        assert seg.first_page in starts and seg.last_page in ends, seg
    spans = {(c.first_page, c.last_page) for c in candidates}
    assert (2, 12) in spans and (7, 20) in spans and (21, 30) in spans and (41, 55) in spans
    assert (1, 12) in spans  # front matter joins the first sections
    rng = random.Random(0)
    picks = {(s.first_page, s.last_page) for s in (sample_segment(sections, 70, rng) for _ in range(200))}
    assert picks == spans  # uniform over candidates: every one gets drawn


def test_segment_fallbacks():
    short = [Section("Only", 1, 1, 5, "layout")]
    assert [(s.first_page, s.last_page) for s in segment_candidates(short, 5)] == [(1, 5)]
    flat = [Section("", 1, 1, 40, "pages")]
    cands = segment_candidates(flat, 40)
    assert cands and all(8 <= c.num_pages <= 15 for c in cands)
    assert sample_segment([], 0, random.Random(0)) is None


@pytest.mark.parametrize("text, language", [
    ("The committee reviewed the quarterly figures and found that revenue grew in every region.", "en"),
    ("Der Ausschuss prüfte die Quartalszahlen und stellte fest, dass der Umsatz in jeder Region wuchs.", "de"),
    ("Le comité a examiné les chiffres trimestriels et constaté que le chiffre d'affaires a augmenté partout.", "fr"),
    ("委员会审查了季度数据，发现每个地区的收入都有所增长，这一结果与去年的预测基本一致，并且超过了预期目标。", "zh"),
])
def test_language_detection(text, language):
    assert detect_language(sample_text([text] * 3)) == language


def test_language_unknown_without_text():
    assert detect_language("") == UNKNOWN
    assert detect_language("Figure 3 12.5 %") == UNKNOWN
    assert len(sample_text(["x" * 1000] * 100, max_chars=6000)) <= 6100


# ------------------------------------------------------------------------------- outline sanity


def _pool_record(path, tmp_path):
    from megatron_vlm.common.inputs import sha256_file
    from megatron_vlm.pool.build import DocTask, PoolConfig, process_document

    task = DocTask(source=path, sha256=sha256_file(path), file_bytes=os.path.getsize(path))
    result = process_document(task, PoolConfig(output=str(tmp_path / "pool"), min_pages=1, workers=0, progress=False))
    assert "record" in result, result
    return result["record"]


def test_good_outline_passes_the_check_and_defines_sections(report, tmp_path):
    pages, toc, labelled, n = report
    assert len(toc) >= 2
    assert check_outline(toc, ["\n".join(b.text for b in p.blocks) for p in pages], n) is None
    path = S.write_report_pdf(str(tmp_path / "good.pdf"), S.ReportSpec(seed=1))
    record = _pool_record(path, tmp_path)
    assert record["section_source"] == "toc" and record["outline_ignored"] == ""


def test_broken_outline_is_ignored_with_a_reason(tmp_path):
    import pymupdf

    good = S.write_report_pdf(str(tmp_path / "good.pdf"), S.ReportSpec(seed=1))
    doc = pymupdf.open(good)
    toc = doc.get_toc(simple=True)
    assert len(toc) >= 4
    doc.set_toc([[level, title, 1] for level, title, _ in toc])  # every entry on page 1
    broken = str(tmp_path / "broken.pdf")
    doc.save(broken)
    doc.close()
    record = _pool_record(broken, tmp_path)
    assert record["section_source"] == "layout"
    assert f"{len(toc)} of {len(toc)} entries on page 1" in record["outline_ignored"]
    assert record["warnings"][0].startswith("outline ignored: ")
    # the layout-based sections are the ones a document without an outline gets
    pages, _, title, n = _read(broken)
    expected = document_sections([], label_document(pages, [], title), n)
    assert [(s.title, s.first_page, s.last_page) for s in expected] == \
        [(s["title"], s["first_page"], s["last_page"]) for s in record["sections"]]
    assert _spans(expected, 1) == EXPECTED_TOP


def test_check_outline_rules():
    texts = ["Intro text here", "Methods and more", "Results shown", "Discussion ends"]
    good = [P.TocEntry(1, "Intro", 1), P.TocEntry(1, "Methods", 2), P.TocEntry(2, "Results", 3),
            P.TocEntry(1, "Discussion", 4)]
    assert check_outline(good, texts, 4) is None
    assert check_outline(good[:1], texts, 4) is None  # too short to be used anyway
    backwards = [good[0], good[3], good[1], good[2]]
    assert "point before the previous entry" in check_outline(backwards, texts, 4)
    wrong_titles = [P.TocEntry(1, "Chapter One", 1), P.TocEntry(1, "Chapter Two", 2), P.TocEntry(1, "Results", 3),
                    P.TocEntry(1, "Discussion", 4)]
    assert "2 of 4 titles not found" in check_outline(wrong_titles, texts, 4)
    assert check_outline(wrong_titles, ["", "", "", ""], 4) is None  # scans: titles not checkable
    assert "outside pages 1-4" in check_outline(good + [P.TocEntry(1, "Appendix", 9)], texts, 4)


def test_outline_titles_survive_lost_ligatures_and_spelled_out_umlauts():
    """Real text layers (texlive-lang-german: udesoftec-doc.pdf drops its 'ft'/'Qu' ligature glyphs and
    prints 'udesofec', 'Qalifikationsarbeiten'; bibleref-german prints 'Einheitsuebersetzung' under the
    outline title 'Einheitsübersetzung'): one lost character in ten is still the title, so the outline
    is used; short or really different titles still count as misses."""
    texts = ["Dokumentation zu\nudesofec\nLATEX-Formatvorlage für Qalifikationsarbeiten",
             "3 Beispiele\nEinheitsuebersetzung (Standard: lang)", "Lutherbibel (kurz)", "Register"]
    toc = [P.TocEntry(1, "udesoftec", 1), P.TocEntry(2, "Formatvorlage für Qualifikationsarbeiten", 1),
           P.TocEntry(1, "Beispiele", 2), P.TocEntry(2, "Einheitsübersetzung", 2), P.TocEntry(2, "Lutherbibel", 3),
           P.TocEntry(1, "Register", 4)]
    assert check_outline(toc, texts, 4) is None
    from megatron_vlm.pool.sections import _key, title_on_page

    assert not title_on_page(_key("Index"), _key("Indax page"))  # too short for a second guess: exact only
    assert title_on_page(_key("Register"), _key("7 Regster der Namen"))  # one lost character of eight
    assert not title_on_page(_key("Methods"), _key("Results and more"))
    assert not title_on_page(_key("Introduction"), _key("Intraduktiom text"))  # 2 of 12 changed: > 10%
