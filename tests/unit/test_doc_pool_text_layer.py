"""Document pool: every text layer is checked; mojibake is OCR'd or rejected, good layers pass.

Real PDFs from Debian's texlive-lang-cyrillic (tests/data/real_pdfs/SOURCES.md): a page of the
Russian "lshort" whose fonts lack ToUnicode (its text extracts as "Ïðåäèñëîâèå"), and two good
ones (Russian churchslavonic, English cyoutenc).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("pymupdf") is None:
    pytest.skip("PyMuPDF is not installed", allow_module_level=True)

from megatron_vlm.common.inputs import sha256_file  # noqa: E402
from megatron_vlm.pool import build as B  # noqa: E402
from megatron_vlm.pool import pdf as P  # noqa: E402
from megatron_vlm.pool import text_quality as T  # noqa: E402
from megatron_vlm.pool.build import (  # noqa: E402
    DocTask,
    PoolConfig,
    check_pool_config,
    merge_pool,
    process_document,
    run_shard,
)
from megatron_vlm.pool.records import DocRecord, load_blocks  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "real_pdfs")
MOJIBAKE = os.path.join(DATA, "lshortru-mojibake-p3-p13.pdf")
GOOD_RU = os.path.join(DATA, "churchslavonic-ru-p1-2.pdf")
GOOD_EN = os.path.join(DATA, "cyoutenc-en-p1-2.pdf")

RUSSIAN = ("Многое из включенного в это введение материала исходит из австрийского введения, "
           "написанного на немецком языке. Глава шесть содержит потенциально опасные сведения о том, "
           "как менять стандартный макет документа.")


def _task(path: str) -> DocTask:
    return DocTask(source=path, sha256=sha256_file(path), file_bytes=os.path.getsize(path))


# ------------------------------------------------------------------------------ the detector


def test_detector_names_the_code_page_of_cyrillic_read_as_latin1():
    garbled = RUSSIAN.encode("cp1251").decode("latin-1")  # what a font without ToUnicode gives
    assert garbled.startswith("Ìíîãîå")
    check = T.check_page_text(garbled)
    assert check.broken and check.reasons == ["mojibake_cp1251"]
    assert (check.repair.script, check.repair.language, check.repair.tesseract) == ("Cyrillic", "ru", "rus")
    assert check.repair.sample.startswith("Многое из включенного")
    koi8 = T.check_page_text(RUSSIAN.encode("koi8_r").decode("latin-1"))
    assert koi8.broken and koi8.reasons == ["mojibake_koi8_r"]
    greek = "Η γλώσσα είναι το κύριο μέσο επικοινωνίας των ανθρώπων και μεταδίδεται από γενιά σε γενιά."
    assert T.check_page_text(greek.encode("cp1253").decode("latin-1")).reasons == ["mojibake_cp1253"]
    # no repair works, yet most letters are Latin-1 look-alikes
    assert T.check_page_text("Ïðåäèñëîâèå Ãëàâà ñîäåðæèò " * 3 + "\u0404").broken


def test_detector_passes_real_text_in_many_languages():
    good = [
        RUSSIAN,
        "Die Größe der Übergänge hängt von der Häufigkeit ab, müßig über Äpfel und Öfen zu streiten.",
        "Le système élève déjà ses règles à côté des théâtres où l'été français est très célèbre.",
        "Þjóðin á Íslandi talar íslensku, sem er norrænt tungumál með þ, ð og æ í stafrófinu sínu.",
        "Debian パッケージの作成方法について説明します。これは新しいメンテナー向けの入門ガイドです。",
        "本文档介绍如何创建 Debian 软件包，面向新的维护者。每一章都包含示例和说明文字。",
        "Tobіas Oetіker, Hubert Partl, Іrene Hyna: українською переклали 2000 року.",  # і/i homoglyphs
        "1.1 Introduction . . . . . . . . . . . . 3\n1.2 Getting started . . . . . . . . . . 5",
    ]
    for text in good:
        check = T.check_page_text(text)
        assert check.verdict in ("ok", "empty") and not check.reasons, (text, check)
    assert T.check_page_text("  12 ").verdict == "empty"


def test_detector_flags_control_and_undecodable_characters():
    assert T.check_page_text("RazÈanai \x96àà RudaiuE \x88ugucauE \x87d \x8fiz\x84iä \x96u " * 3).reasons == [
        "control_chars"]
    assert T.check_page_text("Te\ufffdt wi\ufffdh gl\ue000phs mi\ufffd\ufffding from \ufffdhe font").reasons == [
        "undecodable"]
    # a picture drawn with TeX's line fonts (lshort-ukr page 99): glyph runs between words, no text
    picture = "\\put(0,0){\\line(1,2){.5}} Відрізки малюють так\n" + "\ufffd\n" * 40 + "\x10\x11\x13 \ufffd\ufffd\n"
    assert T.check_page_text(picture).verdict == "ok"


def test_plan_ocr_language_comes_from_the_repair_and_names_missing_data():
    checks = [T.check_page_text(RUSSIAN.encode("cp1251").decode("latin-1")), T.check_page_text(RUSSIAN),
              T.check_page_text("Mu\x86gu\x8f bic\x96 \x8fiz\x84iä \x96u " * 4)]
    everything = T.plan_broken_pages(checks, "ocr", 50, None, lambda langs: True)
    assert (everything.broken, everything.ocr, everything.unrepaired) == ([1, 3], {1: "rus+eng"}, [3])
    assert "script unknown" in everything.advice[0]
    no_russian = T.plan_broken_pages(checks[:1], "ocr", 50, None, lambda langs: "rus" not in langs)
    assert no_russian.unrepaired == [1] and "apt-get install tesseract-ocr-rus" in no_russian.advice[0]
    assert T.plan_broken_pages(checks[:1], "ocr", 0, None, lambda langs: True).unrepaired == [1]
    assert T.plan_broken_pages(checks[:1], "reject", 50, None, lambda langs: True).ocr == {}
    assert T.page_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"


def test_similarity_of_a_layer_and_the_ocr_of_its_page():
    ocr = "Многое из включенного в это ввeдение матерiала исходит из австрийского"  # two misread letters
    assert T.similarity(RUSSIAN, RUSSIAN) == 1.0
    assert 0.5 < T.similarity(RUSSIAN[:len(ocr)], ocr) < 1.0
    assert T.similarity(RUSSIAN.encode("cp1251").decode("latin-1"), ocr) == 0.0
    garbled = T.check_page_text(RUSSIAN.encode("cp1251").decode("latin-1"))
    assert garbled.repaired_text == RUSSIAN and T.check_page_text(RUSSIAN).text == ""  # kept for broken pages


# ----------------------------------------------------------------------------- real documents


def test_real_mojibake_is_rejected_with_pages_and_what_to_do(tmp_path):
    for check in [T.check_page_text(P.page_text(page)) for page in P.open_pdf(MOJIBAKE, P.PdfLimits())]:
        assert check.broken and check.repair.codec == "cp1251" and check.repair.language == "ru"
    result = process_document(_task(MOJIBAKE), PoolConfig(output=str(tmp_path / "pool"), min_pages=1, dpi=72,
                                                           broken_text="reject"))
    rejected = result.get("rejected")
    assert rejected is not None, result["record"]["language"]  # the old code accepted it (as "lij")
    assert rejected["reason"] == "broken_text_layer"
    assert MOJIBAKE in rejected["detail"] and "on 2 of 2 pages (1-2" in rejected["detail"]
    assert "cp1251 mojibake" in rejected["detail"] and "Благодарности" in rejected["detail"]
    images = tmp_path / "pool" / "images"
    assert not images.exists() or not any(images.rglob("*.jpg"))  # rejected before any page was rendered


def test_real_mojibake_without_russian_ocr_data_is_rejected_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "_has_tessdata", lambda langs: "rus" not in langs.split("+"))
    result = process_document(_task(MOJIBAKE), PoolConfig(output=str(tmp_path / "pool"), min_pages=1, dpi=72))
    assert result["rejected"]["reason"] == "broken_text_layer"
    assert "apt-get install tesseract-ocr-rus" in result["rejected"]["detail"]


@pytest.mark.skipif(P.ocr_tessdata("rus") is None,
                    reason="no Tesseract Russian data (apt-get install tesseract-ocr-rus)")
def test_real_mojibake_is_ocr_d_in_russian(tmp_path):
    cfg = PoolConfig(output=str(tmp_path / "pool"), min_pages=1, dpi=72)  # OCR at the default 200 DPI
    record = process_document(_task(MOJIBAKE), cfg)["record"]
    assert [p["source"] for p in record["pages"]] == ["ocr", "ocr"]
    assert record["language"] == "ru"
    layer = record["text_layer"]
    assert layer["status"] == "ocr" and layer["broken_pages"] == [1, 2] and layer["ocr_pages"] == [1, 2]
    assert layer["reasons"] == {"mojibake_cp1251": 2} and layer["ocr_languages"][0].startswith("rus")
    assert record["warnings"][0].startswith("text layer broken on pages 1-2")
    # what the rendered page shows (its OCR) agrees with the repaired text, not with the layer
    for page in ("1", "2"):
        assert layer["ocr_agreement"][page]["text_layer"] < 0.1 < 0.6 < layer["ocr_agreement"][page]["repaired"]
    text = " ".join(b["text"] for page in load_blocks(cfg.output, DocRecord.from_dict(record)) for b in page["blocks"])
    # (Tesseract at 100-200 DPI misses this page's 25 pt heading "Благодарности"; the body is read)
    assert "Многое из включенного в это введение" in text and "Список иллюстраций" in text
    assert "Ìíîãîå" not in text


def test_good_russian_and_english_layers_are_accepted_unchanged(tmp_path):
    for path, language, phrase in ((GOOD_RU, "ru", "церковнославянских текстов"),
                                   (GOOD_EN, "en", "The Cyrillic font encodings")):
        records = []
        for policy in ("ocr", "reject") if language == "ru" else ("ocr",):  # it only matters for broken pages
            cfg = PoolConfig(output=str(tmp_path / f"{language}-{policy}"), min_pages=1, dpi=72, broken_text=policy)
            record = process_document(_task(path), cfg)["record"]
            assert [p["source"] for p in record["pages"]] == ["text", "text"]
            assert record["language"] == language
            assert record["text_layer"]["status"] == "ok" and record["text_layer"]["language_confidence"] > 0.9
            assert not any("text layer" in w for w in record["warnings"])
            blocks = load_blocks(cfg.output, DocRecord.from_dict(record))
            assert phrase in " ".join(" ".join(b["text"].split()) for page in blocks for b in page["blocks"])
            records.append({k: v for k, v in record.items()})
        assert all(r == records[0] for r in records)


def test_pool_counts_broken_layers_in_stats_and_report(tmp_path):
    out = str(tmp_path / "pool")
    cfg = PoolConfig(output=out, min_pages=1, dpi=72, workers=0, progress=False, broken_text="reject")  # in-process
    logged: list[str] = []
    result = run_shard([MOJIBAKE, GOOD_EN], cfg, log=logged.append)
    assert (result.accepted, result.reasons) == (1, {"broken_text_layer": 1})
    stats = merge_pool(out, 1)
    assert stats["text_layers"] == {"ok": 1}
    assert stats["rejected_by_reason"] == {"broken_text_layer": 1}
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert [(r["source"], r["reason"]) for r in report["rejected"]] == [(MOJIBAKE, "broken_text_layer")]
    assert report["text_layers"] == {"ok": 1}
    assert "Text layer" not in B.format_stats(stats)


def test_old_manifest_without_text_layer_still_reads():
    record = {"doc_id": "0" * 16, "source": "/x.pdf", "sha256": "0" * 64, "file_bytes": 1, "num_pages": 1,
              "language": "en", "title": "", "total_tokens": 1, "image_format": "jpeg", "dpi": 144.0,
              "section_source": "pages", "sections": [], "blocks": "b", "pages": []}
    assert DocRecord.from_dict(record).text_layer == {}
    stats = B.pool_stats([(1, "en", 1, "pages", (("text", 1),), False)], [])
    assert stats["text_layers"] == {"ok": 1}
    with_broken = B.pool_stats([(1, "ru", 1, "pages", (("ocr", 1),), False, "ocr")], [])
    assert with_broken["text_layers"] == {"ocr": 1} and "Text layer" in B.format_stats(with_broken)


def test_pools_built_before_the_check_resume_and_the_policy_is_pinned(tmp_path):
    out = str(tmp_path / "pool")
    check_pool_config(PoolConfig(output=out))
    with open(os.path.join(out, "pool_config.json"), encoding="utf-8") as f:
        assert "broken_text" not in json.load(f)  # the default is not recorded: older pools still resume
    with pytest.raises(ValueError, match="broken_text"):
        check_pool_config(PoolConfig(output=out, broken_text="reject"))
    with pytest.raises(ValueError, match="ocr or reject"):
        PoolConfig(output=out, broken_text="skip").validate()
