"""VQA synthesis with the offline teacher and the OCR baselines: every offline answer checked
against the facts the test wrote into its PDFs, the validation rules, the samples' schema and token
counts, resume, the page window, the CLI on every task, and a real PDF end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from fractions import Fraction

import pytest

if importlib.util.find_spec("pymupdf") is None:
    pytest.skip("PyMuPDF is not installed", allow_module_level=True)

from megatron_vlm.data.samples import read_samples  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.synthesis.offline_teacher import OfflineTeacher  # noqa: E402
from megatron_vlm.pool.records import load_blocks, read_manifest  # noqa: E402
from megatron_vlm.pool.sections import Section, segment_candidates  # noqa: E402
from megatron_vlm.synthesis.synthesize import (  # noqa: E402
    SynthesisConfig,
    Synthesizer,
    TokenCounter,
    answer_matches_format,
    check_pair,
    page_references,
    sidecar,
)
from megatron_vlm.synthesis.teachers import QAPair, TeacherRequest  # noqa: E402
from tests.unit.synthesis_fixtures import DocTruth, build_pool, write_facts_pdf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(REPO, "tools", "synthesize_vqa.py")
VQA = ("extract-single", "extract-multi", "reasoning")


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    """Two 18-page fact reports and a 5-page report with a scanned page, in one pool."""
    root = tmp_path_factory.mktemp("facts")
    truths = [write_facts_pdf(str(root / "pdfs" / "facts_a.pdf"), seed=0),
              write_facts_pdf(str(root / "pdfs" / "facts_b.pdf"), seed=1, title="Harbor Facts Review")]
    scan = S.write_report_pdf(str(root / "pdfs" / "scan.pdf"), S.ReportSpec(
        title="Scanned Annex", seed=8, image_only_pages=(3,),
        sections=[S.SectionSpec("Overview", 2), S.SectionSpec("Appendix", 2)]))
    pool = build_pool([t.path for t in truths] + [scan], str(root / "pool"))
    records = {r.source: r for r in read_manifest(pool)}
    assert len(records) == 3
    return pool, {records[t.path].doc_id: t for t in truths}, records[scan]


@pytest.fixture(scope="module")
def counter():
    return TokenCounter()


# ------------------------------------------------------------------ independent answer checks


def _num(text: str) -> Fraction:
    t = str(text).strip().replace(",", "").replace("$", "").replace("%", "").replace("\u2212", "-")
    return Fraction(t)


def _unit(text: str) -> str:
    return "$" if "$" in text else ("%" if "%" in text else "")


def _words(text: str) -> list[str]:
    return [w for w in (re.sub(r"\W", "", t.casefold()) for t in text.split()) if w]


def _page_strings(truth: DocTruth, page: int) -> list[str]:
    """Every text printed on a page, as the test wrote it."""
    pt = truth.pages[page]
    out = [f"{truth.title} - internal", f"Page {page} of {truth.num_pages}"] + pt.headings + pt.paragraphs + pt.captions
    out += [f"{k}: {v}" for k, v in pt.kv.items()]
    if pt.table:
        out += [" ".join(row) for row in [pt.table[0]] + pt.table[1]]
    if page == 1:
        out.append(truth.title)
    return out


def verify(pair: QAPair, truth: DocTruth) -> None:
    """Recompute the pair's answer from the test's own facts; fail on any difference."""
    d = pair.derivation
    assert d is not None
    op, q, ans = d["op"], pair.question, pair.answer
    for cell in d.get("cells", []):
        assert truth.cell(cell["page"], cell["row"], cell["column"]) == cell["text"], cell
        # the table is named by its page, or by its caption (the only table caption printed on its page)
        caption = cell["caption"]
        named = f"Page {cell['page']}" in q or (
            caption and f"\u201c{caption}\u201d" in q and caption in truth.pages[cell["page"]].captions)
        assert named, (q, cell)
        assert f"\u201c{cell['column']}\u201d" in q
        assert d.get("whole_column") or f"\u201c{cell['row']}\u201d" in q
        if d.get("whole_column"):  # every row but the total, of that one table
            header, rows = truth.pages[cell["page"]].table
            assert [c["row"] for c in d["cells"]] == [r[0] for r in rows if r[0] != "Total"]
    if "section" in d:  # a question found by section names it, and the section holds the evidence
        title = d["section"]
        assert f"\u201c{title}\u201d" in q
        start = _heading_page(truth, title)
        assert all(start <= item["page"] < _section_end(truth, title) for item in d.get("items", []))
    cells = [c["text"] for c in d.get("cells", [])]
    if op == "cell":
        got = ans if isinstance(ans, list) else [ans]
        assert len(got) == len(cells)
        for g, c in zip(got, cells):
            assert (str(g) == c) or (pair.answer_format == "Integer" and _num(c) == g), (g, c)
    elif op in ("difference", "sum"):
        values = [_num(c) for c in cells]
        expected = values[0] - values[1] if op == "difference" else sum(values)
        assert _num(ans) == expected, (q, ans, cells)
        assert _unit(str(ans)) == _unit(cells[0]) and len({_unit(c) for c in cells}) == 1
        def decimals(text: str) -> int:
            text = text.rstrip("%")
            return len(text.split(".")[1]) if "." in text else 0

        assert decimals(str(ans)) == max(decimals(c) for c in cells)
    elif op in ("argmax", "argmin"):
        values = {c["row"]: _num(c["text"]) for c in d["cells"]}
        best = (max if op == "argmax" else min)(values.values())
        assert [r for r, v in values.items() if v == best] == [ans]
        assert ("largest" if op == "argmax" else "smallest") in q
    elif op == "count_greater":
        assert ans == sum(1 for c in cells if _num(c) > _num(d["threshold"]))
        assert f"greater than {d['threshold']}?" in q
    elif op == "heading":
        texts = [i["text"] for i in d["items"]]
        assert (ans if isinstance(ans, list) else [ans]) == texts
        for item in d["items"]:
            assert truth.pages[item["page"]].headings == [item["text"]]
    elif op == "caption":
        texts = [i["text"] for i in d["items"]]
        assert (ans if isinstance(ans, list) else [ans]) == texts
        for item in d["items"]:
            same_kind = [c for c in truth.pages[item["page"]].captions if c.lower().startswith(item["kind"])]
            assert same_kind == [item["text"]]
    elif op == "key_value":
        (item,) = d["items"]
        assert truth.pages[item["page"]].kv[item["key"]] == item["text"]
        assert str(ans) == item["text"] or (pair.answer_format == "Integer" and _num(item["text"]) == ans)
    elif op == "locate":
        (item,) = d["items"]
        assert ans == item["page"]
        def printed(p: int) -> list[str]:
            return _printed_headings(truth, p) + truth.pages[p].captions

        assert item["text"] in printed(item["page"])
        assert sum(item["text"] in printed(p) for p in truth.pages) == 1
        assert not page_references(q)
    elif op == "section_text":
        (item,) = d["items"]
        assert ans == item["text"] and item["page"] == _heading_page(truth, d["section"])
        pt = truth.pages[item["page"]]
        # the paragraph written right after that heading (the fixture writes one before a subsection heading)
        assert ans == pt.paragraphs[_printed_headings(truth, item["page"]).index(d["section"])], (ans, pt.paragraphs)
    elif op in ("entries", "row_count"):
        header, rows = truth.pages[d["page"]].table
        assert d["caption"] in truth.pages[d["page"]].captions and f"\u201c{d['caption']}\u201d" in q
        assert d["rows"] == [r[0] for r in rows]
        assert ans == (d["rows"] if op == "entries" else len(rows))
    elif op == "row_difference":
        sizes = []
        for t in d["tables"]:
            header, rows = truth.pages[t["page"]].table
            assert t["caption"] in truth.pages[t["page"]].captions and f"\u201c{t['caption']}\u201d" in q
            sizes.append(len(rows))
        assert ans == sizes[0] - sizes[1] > 0
    elif op in ("subsections", "subsection_count", "table_count"):
        raise AssertionError(f"the fixture has no section with two subsections or tables, yet {op} was asked")
    elif op == "next_word":
        got = ans if isinstance(ans, list) else [ans]
        assert got == [i["word"] for i in d["items"]]
        for item in d["items"]:
            phrase = _words(item["phrase"])
            hits = []
            for text in _page_strings(truth, item["page"]):
                w = _words(text)
                hits += [w[i + len(phrase)] if i + len(phrase) < len(w) else None
                         for i in range(len(w) - len(phrase) + 1) if w[i:i + len(phrase)] == phrase]
            assert hits == [item["word"].casefold()], (item, hits)
            assert f"Page {item['page']}" in q
    elif op == "page_gap":
        (a, b) = d["items"]
        assert ans == b["page"] - a["page"] > 0
        all_headings = [h for pt in truth.pages.values() for h in pt.headings]
        for item in (a, b):
            assert truth.pages[item["page"]].headings == [item["text"]] and all_headings.count(item["text"]) == 1
    else:
        raise AssertionError(f"unknown derivation {op}")
    assert answer_matches_format(ans, pair.answer_format)


def _heading_page(truth: DocTruth, title: str) -> int:
    (page,) = [p for p, pt in truth.pages.items() if title in _printed_headings(truth, p)]
    return page


def _printed_headings(truth: DocTruth, page: int) -> list[str]:
    return ([truth.title] if page == 1 else []) + truth.pages[page].headings


def _section_end(truth: DocTruth, title: str) -> int:
    """First page after the section (the next heading of its level or above starts a new page in the fixture)."""
    start, level = _heading_page(truth, title), title.split()[0].count(".") + 1
    later = [p for p, pt in truth.pages.items() if p > start
             for h in pt.headings if h.split()[0].count(".") + 1 <= level]
    return min(later) if later else truth.num_pages + 1


def _requests(pool, record, task, count, rng):
    spans = [(s.first_page, s.last_page) for s in segment_candidates(record.sections, record.num_pages)]
    for _ in range(count // 2):
        first = rng.randint(1, record.num_pages)
        spans.append((first, min(record.num_pages, first + rng.randint(0, 9))))
    for job, (first, last) in enumerate(spans * (1 + count // max(1, len(spans)))):
        if job >= count:
            break
        yield TeacherRequest(job=job, task=task, pool_dir=pool, record=record, first_page=first, last_page=last,
                             section_titles=[], seed=rng.getrandbits(63))


def test_offline_teacher_answers_are_all_correct(facts):
    pool, truths, _ = facts
    teacher = OfflineTeacher()
    rng = random.Random(0)
    kinds: dict[str, Counter] = defaultdict(Counter)
    checked = 0
    for doc_id, truth in truths.items():
        record = next(r for r in read_manifest(pool) if r.doc_id == doc_id)
        for task in VQA:
            for request in _requests(pool, record, task, 70, rng):
                result = teacher.generate_sync(request)
                if result.pair is None:
                    assert result.drop_reason == "no_usable_facts"
                    continue
                pair = result.pair
                verify(pair, truth)
                assert pair.derivation["checked_against"] == "pdf"
                assert check_pair(pair, task, request.first_page, request.last_page, record.num_pages,
                                  record.sections) is None, pair.question
                assert all(request.first_page <= p <= request.last_page for p in pair.evidence_pages)
                if task == "extract-single":
                    assert len(set(pair.evidence_pages)) == 1
                kinds[task][pair.derivation["kind"]] += 1
                checked += 1
    assert checked > 300
    assert {"table_cell", "caption", "key_value", "locate_section", "locate_table", "section_caption",
            "section_value"} <= set(kinds["extract-single"]), kinds
    assert {"table_cells", "captions", "table_entries"} <= set(kinds["extract-multi"]), kinds
    assert {"difference", "sum", "extreme", "count", "cross_page", "column_total", "column_extreme", "row_count",
            "row_difference"} <= set(kinds["reasoning"]), kinds
    for task in VQA:  # no kind takes over a task (the old "which word comes next" made most pairs)
        assert max(kinds[task].values()) <= 0.5 * sum(kinds[task].values()), kinds[task]


def test_offline_teacher_never_uses_scattered_table_text(tmp_path):
    """A table whose extraction split decimal points off ("4497 .") must not be asked about."""
    from megatron_vlm.synthesis.offline_teacher import parse_table

    good = [["Region", "Q1"], ["A", "449.7"], ["B", "12.5"]]
    assert parse_table(3, good) is not None
    assert parse_table(3, [["Region", "Q1"], ["A", "4497 ."], ["B", "125 ."]]) is None
    assert parse_table(3, [["Region", "Q1"], ["A", "1"], ["A", "2"]]) is None  # row labels not unique
    assert parse_table(3, [["Region", "449.7"], ["A", "1"], ["B", "2"]]) is None  # a number is no header


def test_check_pair_rules():
    sections = [Section("1 Introduction", 1, 1, 9, "toc"), Section("2 Methods", 1, 10, 20, "toc"),
                Section("3 Results", 1, 21, 40, "toc")]

    def pair(q, answer="x", fmt="String", pages=(12,), sources=("Text",)):
        return QAPair(q, answer, fmt, list(pages), list(sources))

    ok = check_pair(pair("What is the sample size on Page 12?"), "extract-single", 10, 20, 40, sections)
    assert ok is None
    reasons = {
        "no_segment_anchor": pair("What is the sample size?"),
        "anchor_outside_segment": pair("What is the sample size on Page 31?"),
        "evidence_outside_segment": pair("What is the sample size on Page 12?", pages=(25,)),
        "evidence_page_missing": pair("What is the sample size on Page 12?", pages=(41,)),
        "not_single_page": pair("What is on Pages 12 and 14?", pages=(12, 14)),
        "answer_type_mismatch": pair("How many rows on Page 12?", answer="many", fmt="Integer"),
        "bad_answer_format": pair("What is on Page 12?", fmt="Number"),
        "global_scope": pair("On Page 12, which term is used across the document?"),
        "empty_question": pair("  "),
        "bad_evidence_source": pair("What is on Page 12?", sources=("Chart",)),
        "no_evidence_pages": pair("What is on Page 12?", pages=()),
    }
    for reason, p in reasons.items():
        drop = check_pair(p, "extract-single", 10, 20, 40, sections)
        assert drop is not None and drop.reason == reason, (reason, drop)
    # section anchors: named as a section (or quoted), overlapping the segment
    for question in ("Which tool is named in the Methods section?", "Which tool is named in \u201c2 Methods\u201d?"):
        assert check_pair(pair(question), "extract-single", 10, 20, 40, sections) is None
    assert check_pair(pair("Which methods are used?"), "extract-single", 10, 20, 40,
                      sections).reason == "no_segment_anchor"
    assert check_pair(pair("What is in the Results section?"), "extract-single", 10, 20, 40,
                      sections).reason == "no_segment_anchor"
    assert page_references("Based on Pages 12, 13, and 19, and pp. 4-9") == [12, 13, 19, 4, 9]
    assert page_references("on Page 12 and page 14") == [12, 14]
    assert page_references("On Page 12, 2023 sales rose", num_pages=40) == [12]
    assert page_references("In the U.S. 2020 budget on p. 3") == [3]
    assert check_pair(pair("On Page 12, 2023 sales were how high?"), "extract-single", 10, 20, 40, sections) is None
    for answer, fmt, good in [(3, "Integer", True), ("1,200", "Integer", True), ("3.5", "Integer", False),
                              ("$45.20", "Float", True), ("98.5%", "Float", True), ("abc", "Float", False),
                              (["a", "b"], "List", True), ("a", "List", False), ([], "List", False),
                              ("Oslo", "String", True), (["Oslo"], "String", False)]:
        assert answer_matches_format(answer, fmt) is good, (answer, fmt)


def _records(path):
    out = []
    for number, item in read_samples(path):
        assert not isinstance(item, Exception), item
        out.append(item)
    return out


def _expected_tokens(counter, sample):
    """Independent count: image tokens + 2 per image + the text pieces + the template's fixed part."""
    tok = counter.tokenizer
    template = tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                   add_special_tokens=False)["input_ids"]
    middle = tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    question = sample.messages[0]["content"][-1]["text"]
    answer = sample.messages[1]["content"]
    text = sum(len(tok(piece, add_special_tokens=False)["input_ids"]) for piece in (question, answer))
    return sum(sample.image_tokens) + 2 * len(sample.images) + text + len(template) + len(middle) + len(end)


@pytest.mark.parametrize("task", VQA + ("ocr-full", "ocr-needle"))
def test_synthesis_every_task_writes_valid_samples(facts, counter, tmp_path, task):
    pool, truths, scan = facts
    out = str(tmp_path / f"{task}.jsonl")
    cfg = SynthesisConfig(pool=pool, task=task, output=out, num_samples=4, seed=3, min_pages=1, max_pages=50,
                          progress=False)
    teacher = OfflineTeacher() if task in VQA else None
    import asyncio

    report = asyncio.run(Synthesizer(cfg, teacher, counter).run())
    samples = _records(out)
    manifest = {r.doc_id: r for r in read_manifest(pool)}
    want = 2 if task == "ocr-full" else 4  # ocr-full: one per document, the scan is dropped
    assert len(samples) == want == report["counts"]["accepted"]
    dropped = [json.loads(line) for line in open(sidecar(out, "dropped.jsonl"))]
    assert report["counts"]["dropped"] == len(dropped)
    assert report["counts"]["dropped_by_reason"] == dict(Counter(d["reason"] for d in dropped))
    if task == "ocr-full":
        assert [d["reason"] for d in dropped] == ["page_text_missing"] and dropped[0]["doc_id"] == scan.doc_id
    for sample in samples:
        record = manifest[sample.meta["doc_id"]]
        assert sample.task == task and sample.image_root == os.path.abspath(pool)
        assert sample.images == [p.image for p in record.pages]  # the WHOLE document, in page order
        assert sample.image_tokens == [p.tokens for p in record.pages]
        assert all(os.path.exists(p) for p in sample.image_paths())
        content = sample.messages[0]["content"]
        assert [c["type"] for c in content] == ["image"] * record.num_pages + ["text"]
        assert content[-1]["text"].startswith(f"The images are the {record.num_pages} pages of one document")
        assert sample.meta["num_pages"] == record.num_pages
        assert sample.meta["num_tokens"] == _expected_tokens(counter, sample)
        assert sample.meta["teacher"]["kind"] == ("offline" if task in VQA else "pool-blocks")
        assert sample.meta["prompt_version"]
        if task in VQA:
            m = sample.meta
            first, last = m["segment"]["first_page"], m["segment"]["last_page"]
            assert m["segment_indices"] == [first - 1, last - 1]
            assert all(first <= p <= last for p in m["evidence_pages"])
            assert m["evidence_page_indices"] == [p - 1 for p in m["evidence_pages"]]
            assert m["answer_format"] in ("String", "Integer", "Float", "List") and m["evidence_sources"]
            expected_answer = json.dumps(m["answer"], ensure_ascii=False) if isinstance(m["answer"], list) \
                else str(m["answer"])
            assert sample.messages[1]["content"] == expected_answer
            assert content[-1]["text"].endswith(m["question"])
            if sample.meta["doc_id"] in truths:
                verify(QAPair(m["question"], m["answer"], m["answer_format"], m["evidence_pages"],
                              m["evidence_sources"], derivation=m["derivation"]), truths[sample.meta["doc_id"]])
        else:
            pages = sample.meta["ocr_pages"]
            assert 1 <= len(pages) <= (record.num_pages if task == "ocr-full" else 3)
            target = sample.messages[1]["content"]
            truth = truths.get(sample.meta["doc_id"])
            if truth is not None:
                _check_transcript(target, truth, pages)


def _check_transcript(target: str, truth: DocTruth, pages: list[int]) -> None:
    parts = re.split(r"(?m)^Page (\d+):\n", target)
    assert parts[0] == ""
    got = {int(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}
    assert sorted(got) == pages
    for page in pages:
        text = " ".join(got[page].split())
        pt = truth.pages[page]
        position = -1
        for piece in pt.headings + pt.paragraphs:  # each in full, headings before their text
            found = text.find(" ".join(piece.split()))
            assert found >= 0, (page, piece[:40])
        assert f"Page {page} of {truth.num_pages}" not in text and "- internal" not in text  # no header/footer
        if pt.table:
            for row in pt.table[1]:
                assert " | ".join(row) in got[page]
        del position


def test_resume_no_duplicates_nothing_lost(facts, counter, tmp_path):
    import asyncio

    pool, _, _ = facts
    out = str(tmp_path / "r.jsonl")

    def run(n, **kw):
        cfg = SynthesisConfig(pool=pool, task="extract-multi", output=out, num_samples=n, seed=5, min_pages=1,
                              progress=False, **kw)
        return asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())

    run(3)
    first = open(out).read()
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a write
    report = run(7)
    text = open(out).read()
    assert text.startswith(first)
    samples = _records(out)
    assert len(samples) == 7 and len({s.id for s in samples}) == 7
    assert len({(s.meta["doc_id"], s.meta["question"]) for s in samples}) == 7
    jobs = [s.meta["job"] for s in samples] + [json.loads(l)["job"] for l in open(sidecar(out, "dropped.jsonl"))]
    assert len(jobs) == len(set(jobs))
    assert len(report["runs"]) == 2 and report["counts"]["accepted"] == 7
    # a clean run with the same settings gives the same samples (jobs are deterministic)
    clean = str(tmp_path / "clean.jsonl")
    cfg = SynthesisConfig(pool=pool, task="extract-multi", output=clean, num_samples=7, seed=5, min_pages=1,
                          progress=False)
    asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())
    assert sorted(s.to_json() for s in _records(clean)) == sorted(s.to_json() for s in samples)
    with pytest.raises(ValueError, match="other settings"):
        run(8, segment_max_pages=12)


def test_page_window_filters_documents(facts, counter, tmp_path):
    import asyncio

    pool, _, _ = facts
    out = str(tmp_path / "w.jsonl")
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=out, num_samples=2, min_pages=32, max_pages=50,
                          progress=False)
    report = asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())
    assert report["status"] == "no_documents" and report["counts"]["accepted"] == 0
    assert report["documents"]["filtered_by_page_window"] == {"too_few_pages": 3}
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=str(tmp_path / "w2.jsonl"), num_samples=3,
                          min_pages=6, max_pages=18, progress=False)
    report = asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())
    assert report["documents"] == {"in_pool": 3, "eligible": 2, "filtered_by_page_window": {"too_few_pages": 1},
                                   "page_window": [6, 18], "filtered_by_length": {}, "max_seq_len": 131072}
    assert {s.meta["num_pages"] for s in _records(str(tmp_path / "w2.jsonl"))} == {18}


def test_cli_runs_as_a_script(facts, tmp_path):
    pool, _, _ = facts
    out = str(tmp_path / "cli.jsonl")
    done = subprocess.run([sys.executable, CLI, "--pool", pool, "--task", "reasoning", "--output", out,
                           "--num-samples", "3", "--teacher", "offline", "--min-pages", "1", "--seed", "1",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "samples: 3 of 3 requested" in done.stdout
    assert len(_records(out)) == 3


def load_cli():
    spec = importlib.util.spec_from_file_location("synthesize_vqa_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    cli = load_cli()
    code = cli.main(["--pool", str(tmp_path / "nope"), "--task", "reasoning", "--output", str(tmp_path / "o.jsonl"),
                     "--num-samples", "3"])
    assert code == 2 and "no manifest.jsonl" in capsys.readouterr().err
    code = cli.main(["--pool", str(tmp_path), "--task", "reasoning", "--output", str(tmp_path / "o.jsonl"),
                     "--num-samples", "3", "--teacher", "openai"])
    assert code == 2 and "--base-url and --model" in capsys.readouterr().err


DEB_PDF = "./usr/share/doc/texlive-doc/latex/base/usrguide.pdf"


def _is_whole_lines(text: str, lines: list[str]) -> bool:
    """``text`` (or its value after "Key:") ends where a printed line ends and starts a line or follows "Key:"."""
    target = "".join(_words(text))
    joined = ["".join(_words(line)) for line in lines]
    for i in range(len(joined)):
        acc = ""
        for j in range(i, len(joined)):
            acc += joined[j]
            if acc == target or (acc.endswith(target) and ":" in lines[i] and joined[i].startswith(
                    "".join(_words(lines[i].split(":", 1)[0])))):
                return True
            if len(acc) >= len(target) + 60:
                break
    return False


def test_real_pdf_end_to_end(tmp_path, counter):
    """The Debian "LaTeX for authors" guide (21 pages): pool -> offline synthesis; every answer is
    checked against PyMuPDF's own reading of the PDF."""
    import asyncio

    from megatron_vlm.pool.pdf import import_pymupdf
    from tests.unit.test_doc_pool import _debian_pdf

    pdf = _debian_pdf("texlive-latex-base-doc", DEB_PDF)
    pool = build_pool([pdf], str(tmp_path / "pool"))
    pymupdf = import_pymupdf()
    doc = pymupdf.open(pdf)
    page_words = {i + 1: _words(doc[i].get_text()) for i in range(doc.page_count)}
    page_lines = {i + 1: [" ".join(line.split()) for line in doc[i].get_text().splitlines() if line.strip()]
                  for i in range(doc.page_count)}
    (record,) = list(read_manifest(pool))
    for task in VQA:
        out = str(tmp_path / f"{task}.jsonl")
        cfg = SynthesisConfig(pool=pool, task=task, output=out, num_samples=5, min_pages=1, seed=2, progress=False)
        report = asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())
        samples = _records(out)
        assert len(samples) == 5, report["counts"]
        for sample in samples:
            m = sample.meta
            assert len(sample.images) == 21
            d = m["derivation"]
            for item in d.get("items", []):
                words = page_words[item["page"]]
                for key in ("text", "phrase"):
                    if key in item:
                        piece = _words(item[key])
                        assert any(words[i:i + len(piece)] == piece for i in range(len(words))), item
                if d["op"] in ("caption", "heading", "section_text", "key_value"):  # whole printed lines
                    assert _is_whole_lines(item["text"], page_lines[item["page"]]), (item, page_lines[item["page"]])
    blocks = load_blocks(pool, record)
    assert blocks


def test_offline_facts_skip_unsafe_text():
    """Wrapped key-value lines, long caption blocks, OCR pages and unconfirmed headings give no facts."""
    from megatron_vlm.synthesis.offline_teacher import _caption_kinds, page_facts

    def page(*blocks, source="text"):
        return {"page": 4, "source": source, "blocks": [{"label": label, "text": text} for label, text in blocks]}

    facts = page_facts(page(("paragraph", "Address: 12 Main Street,\nSpringfield"),
                            ("paragraph", "Owner: Ann Lee\nPhone: 555 0199"),
                            ("paragraph", "Status: done and\nthen some more words follow here")), None)
    assert facts.kv == {"Owner": "Ann Lee", "Phone": "555 0199"}
    facts = page_facts(page(("caption", "Figure 2: Yearly totals"), ("caption", "Table 1: a\nb\nc\nd")), None)
    assert _caption_kinds(facts) == {}
    facts = page_facts(page(("caption", "Figure 2: Yearly totals"), ("caption", "Table 1: Prices")), None)
    assert _caption_kinds(facts) == {"figure": "Figure 2: Yearly totals", "table": "Table 1: Prices"}
    facts = page_facts(page(("paragraph", "Owner: Ann Lee"), ("section", "1 Scope"), source="ocr"), None)
    assert not facts.kv and not facts.headings
    # a heading the outline does not confirm is not used
    assert page_facts(page(("section", "1 Scope")), ["1 Scope"]).headings == ["1 Scope"]
    assert page_facts(page(("section", "1 Scope")), ["2 Other"]).headings == []


def test_too_long_documents_cost_no_teacher_call(facts, counter, tmp_path):
    import asyncio

    pool, _, scan = facts
    teacher = OfflineTeacher()
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=str(tmp_path / "t.jsonl"), num_samples=2,
                          min_pages=1, max_seq_tokens=20000, max_jobs=9, progress=False)
    report = asyncio.run(Synthesizer(cfg, teacher, counter).run())
    samples = _records(str(tmp_path / "t.jsonl"))
    assert samples and {s.meta["doc_id"] for s in samples} == {scan.doc_id}
    assert all(s.meta["num_tokens"] <= 20000 for s in samples)
    # the two 18-page documents cannot fit 20K tokens: ineligible up front, so no job is spent on them
    assert report["documents"]["filtered_by_length"] == {"too_long": 2}
    assert not [d for d in report["dropped"] if d["reason"] == "too_long"]
    assert teacher.usage.requests == report["counts"]["accepted"] + len(report["dropped"])


# ------------------------------------------------- real-document failure modes (review of issue 14)


def _hand_pool(tmp_path, pages: int = 10):
    """A PDF and a pool entry whose blocks carry the layout mistakes seen on real documents: the
    running head and the page number labelled as text (in the margin band, and a second running
    line just below it), a caption and a value line cut at a line end, while the PDF renders them
    whole."""
    from megatron_vlm.common.storage import atomic_write_json_gz
    from megatron_vlm.pool.pdf import import_pymupdf
    from megatron_vlm.pool.records import DocRecord, PageRecord

    pymupdf = import_pymupdf()
    doc = pymupdf.open()
    page_blocks, toc = [], []
    for n in range(1, pages + 1):
        page = doc.new_page(width=612, height=792)
        lines = [(30, "Field Guide: Chapter 3"), (84, "Handbook edition: 2024 internal draft"),
                 (110, f"{n} Survey Area {chr(64 + n)}"),
                 (150, "Table 2: Monthly rates for the northern region"), (190, "Owner: Ann Lee"),
                 (230, "Status: closed"), (770, f"{n + 40}")]
        for y, text in lines:
            page.insert_text((72, y), text, fontsize=10)
        toc.append([1, f"{n} Survey Area {chr(64 + n)}", n])

        def block(label, y, text):
            return {"label": label, "bbox": [144, 2 * y - 20, 900, 2 * y + 4], "text": text}

        page_blocks.append({"page": n, "source": "text", "blocks": [
            block("paragraph", 30, "Field Guide: Chapter 3"),  # running head, labelled as text
            block("paragraph", 84, "Handbook edition: 2024 internal draft"),  # a second one, below the margin band
            block("section", 110, f"{n} Survey Area {chr(64 + n)}"),
            block("caption", 150, "Table 2: Monthly rates for the"),  # cut: the PDF prints the whole line
            block("paragraph", 190, "Owner: Ann"),  # cut at the line end
            block("paragraph", 230, "Status: closed"),
            block("paragraph", 770, f"{n + 40}"),  # the printed page number, labelled as text
        ]})
    doc.set_toc(toc)
    pdf = str(tmp_path / "guide.pdf")
    doc.save(pdf)
    pool = str(tmp_path / "pool")
    atomic_write_json_gz(os.path.join(pool, "blocks", "ab", "abcd.json.gz"), {"pages": page_blocks})
    sections = [Section(f"{n} Survey Area {chr(64 + n)}", 1, n, n, "toc") for n in range(1, pages + 1)]
    record = DocRecord(
        doc_id="abcd", source=pdf, sha256="0" * 64, file_bytes=1, num_pages=pages, language="en", title="Guide",
        total_tokens=pages * 100, image_format="jpeg", dpi=144.0, section_source="toc", sections=sections,
        blocks="blocks/ab/abcd.json.gz",
        pages=[PageRecord(n, f"images/{n}.jpg", 1224, 1584, 1204, 1568, 100, 144.0, "text", 6, 100)
               for n in range(1, pages + 1)])
    return pool, record


def test_no_running_head_page_number_or_cut_line_is_an_answer(tmp_path):
    pool, record = _hand_pool(tmp_path)
    teacher = OfflineTeacher()
    rng = random.Random(1)
    answers = []
    for task in VQA:
        for job in range(40):
            first = rng.randint(1, 8)
            request = TeacherRequest(job=job, task=task, pool_dir=pool, record=record, first_page=first,
                                     last_page=first + 2, section_titles=[], seed=rng.getrandbits(63))
            result = teacher.generate_sync(request)
            if result.pair is not None:
                answers.append((result.pair.question, result.pair.answer, result.pair.derivation["kind"]))
    assert answers
    for question, answer, kind in answers:
        for text in (answer if isinstance(answer, list) else [answer]):
            text = str(text)
            assert "Field Guide" not in text and "Chapter 3" not in text, (question, answer)
            assert "internal draft" not in text, (question, answer)
            if kind not in ("locate_section", "locate_table", "page_gap", "subsection_count", "row_count"):
                assert not re.fullmatch(r"\d+", text), (question, answer)  # no printed page number
            assert text not in ("Ann", "Table 2: Monthly rates for the"), (question, answer)  # no cut line
    # what is left is whole: the value line "Status: closed", the section headings
    assert ("closed" in [a for _, a, _ in answers]) and any(k == "locate_section" for _, _, k in answers)


def test_question_kind_mix_is_reported(facts, counter, tmp_path):
    import asyncio

    pool, _, _ = facts
    out = str(tmp_path / "k.jsonl")
    cfg = SynthesisConfig(pool=pool, task="extract-single", output=out, num_samples=12, seed=4, min_pages=1,
                          progress=False)
    report = asyncio.run(Synthesizer(cfg, OfflineTeacher(), counter).run())
    kinds = Counter(s.meta["derivation"]["kind"] for s in _records(out))
    assert report["question_kinds"] == dict(kinds) and sum(kinds.values()) == 12
    assert len(kinds) >= 4 and max(kinds.values()) <= 6, kinds  # a mix, no kind taking over
    assert "next_word" not in kinds  # "which word comes after ..." is no longer asked
    (line,) = [x for x in load_cli().summary(report).splitlines() if x.startswith("question kinds: ")]
    assert all(f"{k} {n} ({100 * n / 12:.0f}%)" in line for k, n in kinds.items()), line


def test_section_anchored_questions_name_no_page(facts):
    """Questions found by section or caption: no page named, the anchor passes the pair checks."""
    pool, truths, _ = facts
    teacher = OfflineTeacher()
    rng = random.Random(3)
    unanchored = Counter()
    for doc_id, truth in truths.items():
        record = next(r for r in read_manifest(pool) if r.doc_id == doc_id)
        for task in VQA:
            for request in _requests(pool, record, task, 30, rng):
                pair = teacher.generate_sync(request).pair
                if pair is None or page_references(pair.question):
                    continue
                verify(pair, truth)
                assert check_pair(pair, task, request.first_page, request.last_page, record.num_pages,
                                  record.sections) is None, pair.question
                unanchored[pair.derivation["kind"]] += 1
    assert {"locate_section", "table_cell", "column_total"} <= set(unanchored), unanchored


def test_table_aggregation_on_a_synthetic_report(tmp_path):
    """write_report_pdf's revenue table: the column total over every region, read back from the PDF."""
    from decimal import Decimal

    from megatron_vlm.pool.pdf import import_pymupdf

    pdf = S.write_report_pdf(str(tmp_path / "report.pdf"), S.ReportSpec(
        seed=11, sections=[S.SectionSpec("Results", 2, table=True), S.SectionSpec("Discussion", 1)]))
    pool = build_pool([pdf], str(tmp_path / "pool"))
    (record,) = list(read_manifest(pool))
    lines = [line.strip() for line in import_pymupdf().open(pdf)[1].get_text().splitlines()]
    header = lines[lines.index("Region"):lines.index("Region") + 5]
    table = {lines[i]: lines[i + 1:i + 5] for i, line in enumerate(lines) if re.fullmatch(r"Region [A-Z]", line)}
    assert len(table) == 5 and header == ["Region", "Q1", "Q2", "Q3", "Q4"]
    teacher = OfflineTeacher()
    totals = []
    for seed in range(60):
        pair = teacher.generate_sync(TeacherRequest(job=seed, task="reasoning", pool_dir=pool, record=record,
                                                    first_page=1, last_page=record.num_pages, section_titles=[],
                                                    seed=seed)).pair
        if pair is not None and pair.derivation["kind"] == "column_total":
            column = next(c for c in header[1:] if f"\u201c{c}\u201d" in pair.question)
            expected = sum(Decimal(values[header.index(column) - 1]) for values in table.values())
            assert Decimal(str(pair.answer)) == expected, (pair.question, pair.answer, expected)
            assert "Table 1: Quarterly revenue by region (million USD)" in pair.question and "Page" not in pair.question
            totals.append(pair)
    assert totals
