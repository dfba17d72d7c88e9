"""Document pool end to end: records and report on generated PDFs, dedup and decontamination,
shards and merge, resume after a kill, the worker pool's limits, and a real Debian PDF."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

if importlib.util.find_spec("pymupdf") is None:  # without importing it: its add-ons load ONNX
    pytest.skip("PyMuPDF is not installed", allow_module_level=True)

from megatron_vlm.data.image_processing import image_token_count  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.common.inputs import (  # noqa: E402
    discover_inputs,
    parse_shard,
    read_hash_list,
    select_shard,
    sha256_file,
    shard_of,
)
from megatron_vlm.pool.build import PoolConfig, format_stats, merge_pool, run_shard, shard_paths  # noqa: E402
from megatron_vlm.pool.records import REJECT_REASONS, DocRecord, load_blocks, read_manifest  # noqa: E402
from megatron_vlm.common.storage import JsonlAppender, read_jsonl  # noqa: E402
from megatron_vlm.common.workers import run_tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(REPO, "tools", "build_doc_pool.py")
QUIET = {"log": lambda msg: None}


def _cfg(output, **kw) -> PoolConfig:
    values = {"min_pages": 1, "workers": 0, "progress": False}
    values.update(kw)
    return PoolConfig(output=str(output), **values)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return S.write_sample_set(str(tmp_path_factory.mktemp("pdfs")))


@pytest.fixture(scope="module")
def pool(sample, tmp_path_factory):
    """The sample set through one shard with two real worker processes, merged."""
    output = str(tmp_path_factory.mktemp("pool"))
    folder = os.path.dirname(next(iter(sample.good.values())))
    result = run_shard(discover_inputs([folder]), _cfg(output, workers=2), **QUIET)
    stats = merge_pool(output, 1)
    return output, result, stats


def test_good_documents_accepted_and_every_rejection_reported(sample, pool):
    output, result, stats = pool
    records = list(read_manifest(output))
    assert sorted(r.source for r in records) == sorted(sample.good.values())
    with open(os.path.join(output, "report.json")) as f:
        report = json.load(f)
    got = {r["source"]: r["reason"] for r in report["rejected"]}
    assert got == {path: reason for path, reason in sample.bad.values()}
    assert all(r["reason"] in REJECT_REASONS and r["detail"] for r in report["rejected"])
    dup = next(r for r in report["rejected"] if r["reason"] == "duplicate")
    assert dup["duplicate_of"] == sample.good["report_en"]
    assert report["counts"] == {"inputs": 9, "accepted": 4, "rejected": 5, "rejected_by_reason": {
        "corrupt": 2, "duplicate": 1, "encrypted": 1, "too_few_pages": 1}}
    assert (result.accepted, result.rejected, result.resumed) == (4, 5, 0)


def test_records_pages_images_and_blocks(sample, pool):
    from PIL import Image

    output, _, _ = pool
    lines = open(os.path.join(output, "manifest.jsonl"), encoding="utf-8").read().splitlines()
    ids = [json.loads(line)["doc_id"] for line in lines]
    assert ids == sorted(ids)
    by_source = {}
    for line in lines:
        data = json.loads(line)
        for key in ("doc_id", "source", "sha256", "num_pages", "language", "sections", "pages"):
            assert key in data, key
        record = DocRecord.from_dict(data)
        assert record.to_dict() == data
        assert record.sha256 == sha256_file(record.source) and record.doc_id == record.sha256[:16]
        assert record.num_pages == len(record.pages) and record.total_tokens == sum(p.tokens for p in record.pages)
        blocks = load_blocks(output, record)
        assert [b["page"] for b in blocks] == list(range(1, record.num_pages + 1))
        for page, page_blocks in zip(record.pages, blocks):
            with Image.open(os.path.join(output, page.image)) as im:
                assert im.format == "JPEG" and im.size == (page.width, page.height)
            assert page.tokens == image_token_count(page.height, page.width)
            assert page.tokens == (page.resized_height // 28) * (page.resized_width // 28)
            assert page.num_blocks == len(page_blocks["blocks"])
            for block in page_blocks["blocks"]:
                x0, y0, x1, y1 = block["bbox"]
                assert 0 <= x0 <= x1 <= page.width + 1 and 0 <= y0 <= y1 <= page.height + 1
        covered = {p for s in record.sections for p in range(s.first_page, s.last_page + 1)}
        assert covered == set(range(1, record.num_pages + 1))
        by_source[record.source] = record
    assert {by_source[sample.good[k]].language for k in ("report_en", "report_de", "report_zh")} == {"en", "de", "zh"}
    scan = by_source[sample.good["scan"]]
    assert [p.source for p in scan.pages] == ["text", "text", "none", "text", "text"]
    assert by_source[sample.good["report_de"]].pages[0].tokens == image_token_count(1684, 1190)  # A4
    assert by_source[sample.good["report_en"]].title == "Synthetic Technical Report"


def test_stats_table(pool):
    output, _, stats = pool
    with open(os.path.join(output, "stats.json")) as f:
        assert json.load(f) == stats
    assert stats["documents"] == 4 and stats["page_range"] == [5, 11]
    assert stats["total_pages"] == 5 + 9 + 10 + 11 and stats["avg_pages"] == round(35 / 4, 2)
    assert set(stats["languages"]) == {"en", "de", "zh"}
    assert abs(sum(v["percent"] for v in stats["languages"].values()) - 100) < 0.01
    table = format_stats(stats)
    for needle in ("Number of documents", "Page-count range", "[5, 11]", "Average pages", "Total pages", "English"):
        assert needle in table


def test_rerun_skips_finished_documents(sample, pool):
    output, first, _ = pool
    folder = os.path.dirname(next(iter(sample.good.values())))
    again = run_shard(discover_inputs([folder]), _cfg(output, workers=2), **QUIET)
    assert (again.resumed, again.accepted, again.rejected) == (9, 0, 0)
    with pytest.raises(ValueError, match="other settings"):
        run_shard(discover_inputs([folder]), _cfg(output, dpi=72), **QUIET)


def test_exclusion_list_and_hash_file_format(tmp_path, sample):
    a, b = sample.good["report_de"], sample.good["report_zh"]
    hashes = tmp_path / "eval.sha256"
    hashes.write_text(f"# MMLongBench-Doc\n{sha256_file(a)}  {os.path.basename(a)}\n")
    assert read_hash_list(str(hashes)) == {sha256_file(a)}
    bad = tmp_path / "bad.txt"
    bad.write_text("not-a-hash\n")
    with pytest.raises(ValueError):
        read_hash_list(str(bad))
    out = tmp_path / "pool"
    run_shard([a, b], _cfg(out), exclude=read_hash_list(str(hashes)), **QUIET)
    merge_pool(str(out), 1)
    assert [r.source for r in read_manifest(str(out))] == [b]
    report = json.load(open(out / "report.json"))
    assert [(r["source"], r["reason"]) for r in report["rejected"]] == [(a, "contaminated")]


def test_duplicates_across_shards_are_dropped_at_merge(tmp_path):
    src = S.write_report_pdf(str(tmp_path / "base.pdf"), S.ReportSpec(sections=[S.SectionSpec("A", 1)], seed=9))
    names = [f"copy_{k:02d}.pdf" for k in range(40)]
    first = next(n for n in names if shard_of(str(tmp_path / n), 2) == 0)
    second = next(n for n in names if shard_of(str(tmp_path / n), 2) == 1)
    for name in (first, second):
        shutil.copy(src, tmp_path / name)
    paths = [str(tmp_path / first), str(tmp_path / second)]
    out = tmp_path / "pool"
    for index in (0, 1):
        result = run_shard(paths, _cfg(out), shard=(index, 2), **QUIET)
        assert result.accepted == 1  # each shard sees only its own copy
    merge_pool(str(out), 2)
    records = list(read_manifest(str(out)))
    keep, drop = sorted(paths)
    assert [r.source for r in records] == [keep]
    report = json.load(open(out / "report.json"))
    assert report["rejected"] == [{"source": drop, "reason": "duplicate", "detail": "same SHA-256 as another document",
                                   "sha256": sha256_file(src), "duplicate_of": keep}]


def test_timeout_is_a_rejection_and_retry_failed_redoes_it(tmp_path, sample):
    path = sample.good["report_en"]
    out = tmp_path / "pool"
    first = run_shard([path], _cfg(out, workers=1, doc_timeout=0.05), **QUIET)
    assert first.reasons == {"timeout": 1}
    assert not glob.glob(str(out / "images" / "*" / "*" / "*.jpg"))  # a killed document leaves nothing
    assert run_shard([path], _cfg(out, workers=1), **QUIET).resumed == 1  # a rejection is final ...
    again = run_shard([path], _cfg(out, workers=1, retry_failed=True), **QUIET)  # ... unless retried
    assert again.accepted == 1
    merge_pool(str(out), 1)
    report = json.load(open(out / "report.json"))
    assert report["counts"]["accepted"] == 1 and report["rejected"] == []


def test_input_discovery_and_shards(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ("a/x.pdf", "a/deep/y.PDF", "a/notes.txt", "b.pdf"):
        (tmp_path / rel).write_bytes(b"%PDF-1.7\n")
    listing = tmp_path / "list.txt"
    listing.write_text("# my inputs\nb.pdf\na/deep\nmissing.pdf\n")
    missing = []
    found = discover_inputs([str(tmp_path / "a"), str(tmp_path / "*.pdf"), str(listing)], missing)
    expected = sorted(str(tmp_path / rel) for rel in ("a/x.pdf", "a/deep/y.PDF", "b.pdf"))
    assert found == expected and missing == ["missing.pdf"]
    paths = [f"/data/pdfs/{i:05d}.pdf" for i in range(500)]
    shards = [select_shard(paths, i, 4) for i in range(4)]
    assert sorted(p for s in shards for p in s) == paths
    assert all(80 < len(s) < 170 for s in shards)  # hash spreads evenly
    assert select_shard(paths[:100], 1, 4) == [p for p in shards[1] if p in set(paths[:100])]  # stable
    assert parse_shard("2/8") == (2, 8)
    for bad in ("8/8", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_jsonl_torn_tail_is_cut_before_appending(tmp_path):
    path = str(tmp_path / "m.jsonl")
    with JsonlAppender(path) as out:
        out.append({"a": 1})
        out.append({"b": "é"})
    with open(path, "ab") as f:
        f.write(b'{"c": 3, "half a rec')
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}]
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"b": "é"}]
    with JsonlAppender(path) as out:
        out.append({"d": 4})
    assert read_jsonl(path) == [{"a": 1}, {"b": "é"}, {"d": 4}]


def _task(item):
    kind, value = item
    if kind == "sleep":
        time.sleep(value)
    elif kind == "exit":
        os._exit(3)
    elif kind == "raise":
        raise RuntimeError("bad page")
    elif kind == "alloc":
        return len(bytearray(value))
    return value


def test_worker_pool_kills_overdue_and_survives_crashes():
    tasks = [("sleep", 60), ("ok", 1), ("exit", 0), ("raise", 0), ("ok", 2), ("alloc", 3 * 2**30)]
    start = time.monotonic()
    outcomes = {str(t): o for t, o in run_tasks(tasks, _task, workers=2, timeout=2.0, memory_bytes=2 * 2**30)}
    assert time.monotonic() - start < 30
    assert outcomes["('sleep', 60)"].status == "timeout" and 2.0 <= outcomes["('sleep', 60)"].seconds < 5
    assert outcomes["('ok', 1)"].status == "ok" and outcomes["('ok', 1)"].value == 1
    assert outcomes["('ok', 2)"].value == 2
    assert outcomes["('exit', 0)"].status == "crash" and "exit code 3" in outcomes["('exit', 0)"].detail
    assert outcomes["('raise', 0)"].status == "error" and "bad page" in outcomes["('raise', 0)"].detail
    assert outcomes[str(("alloc", 3 * 2**30))].status == "error"  # MemoryError under the address-space cap


def _cli(inputs, output, *extra):
    return [sys.executable, CLI, "--input", *inputs, "--output", output, "--min-pages", "1", "--workers", "1",
            "--no-progress", *extra]


def test_kill_and_resume_gives_the_same_manifest(tmp_path):
    folder = tmp_path / "pdfs"
    spec = [S.SectionSpec("One", 3, table=True), S.SectionSpec("Two", 3, figure=True)]
    for k in range(6):
        S.write_report_pdf(str(folder / f"doc{k}.pdf"), S.ReportSpec(sections=spec, seed=20 + k))
    S.write_not_a_pdf(str(folder / "junk.pdf"))
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    subprocess.run(_cli([str(folder)], clean), check=True, capture_output=True)

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(_cli([str(folder)], resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    shard_manifest = shard_paths(resumed, 0, 1)["manifest"]
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(shard_manifest) and len(read_jsonl(shard_manifest)) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its workers: a hard kill mid-run
        proc.wait()
    done_before = len(read_jsonl(shard_manifest))
    assert 2 <= done_before < 6, "the run must be killed mid-way"
    assert not os.path.exists(os.path.join(resumed, "manifest.jsonl"))
    with open(shard_manifest, "ab") as f:  # and as if it died inside a write
        f.write(b'{"doc_id": "00000000", "source": "/half/writ')

    rerun = subprocess.run(_cli([str(folder)], resumed), check=True, capture_output=True, text=True)
    assert f"{done_before + 1} already done" in rerun.stderr or f"{done_before} already done" in rerun.stderr
    for name in ("manifest.jsonl", "report.json", "stats.json"):
        with open(os.path.join(clean, name), "rb") as a, open(os.path.join(resumed, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not glob.glob(os.path.join(resumed, "**", ".tmp-*"), recursive=True)
    assert len(read_jsonl(shard_manifest)) == 6


DEB_PDF = "./usr/share/doc/texlive-doc/latex/base/usrguide.pdf"


def _debian_pdf(package: str, member: str) -> str:
    """A real PDF from a Debian documentation package (cached), or skip the test."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "megatron-vlm", "test-pdfs")
    target = os.path.join(cache, os.path.basename(member))
    if os.path.exists(target):
        return target
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("apt-get/dpkg-deb not available")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, timeout=300)
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if got.returncode != 0 or not debs:
            pytest.skip(f"apt-get download {package} failed: {got.stderr.decode()[-300:]}")
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", debs[0]], stdout=subprocess.PIPE)
        data = None
        with tarfile.open(fileobj=tar.stdout, mode="r|*") as archive:
            for entry in archive:
                if entry.name == member:
                    data = archive.extractfile(entry).read()
                    break
        tar.kill()
        tar.wait()
    if data is None:
        pytest.skip(f"{member} not in {package}")
    os.makedirs(cache, exist_ok=True)
    tmp_target = target + f".{os.getpid()}"
    with open(tmp_target, "wb") as f:
        f.write(data)
    os.replace(tmp_target, target)
    return target


def test_real_debian_pdf(tmp_path):
    pdf = _debian_pdf("texlive-latex-base-doc", DEB_PDF)  # "LaTeX for authors", 21 A4 pages
    out = str(tmp_path / "pool")
    done = subprocess.run([sys.executable, CLI, "--input", pdf, "--output", out, "--workers", "1", "--no-progress"],
                          check=True, capture_output=True, text=True)
    assert "Number of documents" in done.stdout
    (record,) = list(read_manifest(out))
    assert record.num_pages == 21 and record.language == "en" and record.section_source == "toc"
    assert hashlib.sha256(open(pdf, "rb").read()).hexdigest() == record.sha256
    for page in record.pages:
        assert page.source == "text" and page.tokens == image_token_count(page.height, page.width)
    top = [(s.title, s.first_page) for s in record.sections if s.level == 1]
    assert ("1 Introduction", 2) in top and ("6 Case changing", 20) in top
    blocks = load_blocks(out, record)
    labels = {b["label"] for page in blocks for b in page["blocks"]}
    assert {"title", "section", "paragraph", "footer"} <= labels
    page2 = [(b["label"], b["text"]) for b in blocks[1]["blocks"] if b["label"] == "section"]
    assert ("section", "1 Introduction") in page2


def test_near_duplicate_documents_kept_once(tmp_path):
    """The same report re-saved (other metadata, garbage-collected and deflated: another SHA-256)
    is a near duplicate of the first by path; an unrelated report is kept; in one shard or two."""
    import pymupdf

    folder = tmp_path / "pdfs"
    folder.mkdir()
    first = S.write_report_pdf(str(folder / "a_report.pdf"), S.ReportSpec(seed=1))
    doc = pymupdf.open(first)
    doc.set_metadata({"title": "Another title", "author": "Someone else", "producer": "re-saved"})
    doc.save(str(folder / "b_resaved.pdf"), garbage=4, deflate=True)
    doc.close()
    other = S.write_report_pdf(str(folder / "c_other.pdf"), S.ReportSpec(seed=2))
    resaved = str(folder / "b_resaved.pdf")
    assert sha256_file(first) != sha256_file(resaved)
    for shards in (1, 2):
        output = str(tmp_path / f"pool-{shards}")
        for index in range(shards):
            run_shard(discover_inputs([str(folder)]), _cfg(output), shard=(index, shards), **QUIET)
        stats = merge_pool(output, shards)
        records = list(read_manifest(output))
        assert sorted(r.source for r in records) == sorted([first, other])
        with open(os.path.join(output, "report.json")) as f:
            report = json.load(f)
        (rejected,) = report["rejected"]
        keeper = next(r for r in records if r.source == first)
        assert rejected["reason"] == "near_duplicate" and rejected["source"] == resaved
        assert rejected["duplicate_of"] == first and f"doc_id {keeper.doc_id}" in rejected["detail"]
        assert float(rejected["detail"].split("similarity ")[1].split()[0]) >= 0.8
        assert report["counts"]["rejected_by_reason"] == {"near_duplicate": 1}
        assert stats["near_duplicates"]["compared"] == 3


REAL_PDFS = os.path.join(REPO, "tests", "data", "real_pdfs")


def test_real_near_duplicates_same_bibliography_built_from_two_encodings(tmp_path):
    """Real documents (tests/data/real_pdfs/SOURCES.md): gost's example bibliography built once from
    cp1251 sources and once from UTF-8 ones. Their text layers differ in line breaks, hyphenation and
    the initials the cp1251 build lost (5-word shingle Jaccard 0.70 with plain words); the pool must
    still keep one. An unrelated English document is kept."""
    import shutil

    folder = tmp_path / "pdfs"
    folder.mkdir()
    names = ("a_gost2008-cp1251-p1-3.pdf", "b_ugost2008-utf8-p1-3.pdf", "c_cyoutenc-en-p1-2.pdf")
    for name in names:
        shutil.copy(os.path.join(REAL_PDFS, name[2:]), folder / name)
    output = str(tmp_path / "pool")
    run_shard(discover_inputs([str(folder)]), _cfg(output, dpi=36), **QUIET)
    merge_pool(output, 1)
    kept = sorted(os.path.basename(r.source) for r in read_manifest(output))
    assert kept == [names[0], names[2]]
    with open(os.path.join(output, "report.json")) as f:
        (rejected,) = json.load(f)["rejected"]
    assert rejected["reason"] == "near_duplicate" and rejected["source"].endswith(names[1])
    assert rejected["duplicate_of"].endswith(names[0])


def test_little_text_is_not_compared():
    from megatron_vlm.pool.near_dup import MIN_WORDS, NearDuplicateFinder, text_minhash

    assert text_minhash(["a scanned page with a caption"]) == []
    finder = NearDuplicateFinder()
    assert finder.add("scan-1.pdf", []) is None and finder.add("scan-2.pdf", []) is None
    words = " ".join(f"word{i}" for i in range(MIN_WORDS))
    assert finder.add("a.pdf", text_minhash([words])) is None
    assert finder.add("b.pdf", text_minhash([words])) == ("a.pdf", 1.0)
    assert finder.stats()["compared"] == 2 and finder.stats()[f"not_compared_under_{MIN_WORDS}_words"] == 2
