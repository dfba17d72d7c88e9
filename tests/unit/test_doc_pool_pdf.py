"""Document pool, one PDF at a time: rendering and token counts, broken files, bounded analysis, OCR."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("pymupdf") is None:  # without importing it: its add-ons load ONNX
    pytest.skip("PyMuPDF is not installed", allow_module_level=True)

from megatron_vlm.data.image_processing import MAX_PIXELS  # noqa: E402
from megatron_vlm.pool import pdf as P  # noqa: E402
from megatron_vlm.pool import synthetic_pdfs as S  # noqa: E402
from megatron_vlm.common.inputs import sha256_file  # noqa: E402
from megatron_vlm.pool.build import DocTask, PoolConfig, process_document  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _task(path: str) -> DocTask:
    return DocTask(source=path, sha256=sha256_file(path), file_bytes=os.path.getsize(path))


def _reference(height: int, width: int) -> tuple[int, int, int]:
    """Qwen2.5-VL's own arithmetic (transformers' smart_resize), max_pixels pinned as in the recipe:
    (resized height, resized width, tokens)."""
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    new_h, new_w = hf.smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=MAX_PIXELS)
    return new_h, new_w, (new_h // 28) * (new_w // 28)


def test_import_skips_onnx_addons():
    code = ("import sys; from megatron_vlm.pool.pdf import import_pymupdf; import_pymupdf(); "
            "bad = [m for m in ('onnxruntime', 'pymupdf.layout', 'pymupdf4llm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_token_counts_match_smart_resize_for_page_sizes(tmp_path):
    sizes = {"letter": S.LETTER, "a4": S.A4, "slide": S.SLIDE_16_9, "tiny": S.TINY, "huge": S.HUGE}
    path = S.write_page_sizes_pdf(str(tmp_path / "sizes.pdf"), sizes.values())
    cfg = PoolConfig(output=str(tmp_path / "pool"), min_pages=1)
    result = process_document(_task(path), cfg)
    assert "record" in result, result
    pages = {name: page for name, page in zip(sizes, result["record"]["pages"])}
    # 144 DPI = 2 pixels per point; the huge page is rendered smaller, under the pixel cap
    assert (pages["letter"]["width"], pages["letter"]["height"]) == (1224, 1584)
    assert pages["letter"]["tokens"] == 2508  # DESIGN.md §3: 1232 x 1596 after smart_resize
    assert (pages["letter"]["resized_width"], pages["letter"]["resized_height"]) == (1232, 1596)
    assert (pages["a4"]["width"], pages["a4"]["height"]) == (1190, 1684)
    assert (pages["slide"]["width"], pages["slide"]["height"]) == (1920, 1080)
    assert (pages["tiny"]["width"], pages["tiny"]["height"]) == (40, 48)
    huge = pages["huge"]
    assert huge["width"] * huge["height"] <= MAX_PIXELS and huge["dpi"] < 144
    assert abs(huge["width"] / huge["height"] - 7200 / 10800) < 0.01
    for name, page in pages.items():
        assert (page["resized_height"], page["resized_width"], page["tokens"]) == _reference(
            page["height"], page["width"]), name
        assert page["dpi"] == (144.0 if name != "huge" else page["dpi"])
        image = os.path.join(cfg.output, page["image"])
        from PIL import Image

        with Image.open(image) as im:
            assert im.size == (page["width"], page["height"]), name
    assert pages["tiny"]["tokens"] == 6  # grown past min_pixels (3136) to 84 x 56
    assert 16000 <= pages["huge"]["tokens"] <= 16384  # near the pinned maximum


def test_render_zoom_caps_pixels():
    assert P.render_zoom(612, 792, 144, MAX_PIXELS) == 2.0
    zoom = P.render_zoom(14400, 14400, 144, MAX_PIXELS)
    assert (14400 * zoom) ** 2 <= MAX_PIXELS * 1.0001


@pytest.mark.parametrize("writer, reason", [
    (S.write_encrypted_pdf, "encrypted"),
    (S.write_not_a_pdf, "corrupt"),
    (S.write_truncated_pdf, "corrupt"),
    (S.write_zero_page_pdf, "too_few_pages"),
])
def test_broken_files_are_rejected_with_reason(tmp_path, writer, reason):
    path = writer(str(tmp_path / "x.pdf"))
    result = process_document(_task(path), PoolConfig(output=str(tmp_path / "pool"), min_pages=0))
    assert result.get("rejected", {}).get("reason") == reason, result
    assert not os.path.exists(tmp_path / "pool" / "images"), "a rejected document leaves no images"


def test_page_count_limits(tmp_path):
    path = S.write_report_pdf(str(tmp_path / "r.pdf"), S.ReportSpec(sections=[S.SectionSpec("A", 2)]))  # 3 pages
    few = process_document(_task(path), PoolConfig(output=str(tmp_path / "p1"), min_pages=4))
    many = process_document(_task(path), PoolConfig(output=str(tmp_path / "p2"), min_pages=1, max_pages=2))
    ok = process_document(_task(path), PoolConfig(output=str(tmp_path / "p3"), min_pages=3, max_pages=3))
    assert few["rejected"]["reason"] == "too_few_pages"
    assert many["rejected"]["reason"] == "too_many_pages"
    assert ok["record"]["num_pages"] == 3


def test_owner_password_only_pdf_is_readable(tmp_path):
    pymupdf = P.import_pymupdf()
    plain = S.write_report_pdf(str(tmp_path / "plain.pdf"), S.ReportSpec(sections=[S.SectionSpec("A", 1)]))
    doc = pymupdf.open(plain)
    locked = str(tmp_path / "locked.pdf")
    doc.save(locked, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", permissions=0)
    result = process_document(_task(locked), PoolConfig(output=str(tmp_path / "pool"), min_pages=1))
    assert result["record"]["num_pages"] == 2


def test_unusable_text_layers_are_detected():
    block = lambda text: P.TextBlock(bbox=(0, 0, 1, 1), lines=[text], size=10, bold=0)  # noqa: E731
    assert P.text_is_usable([block("A normal sentence with words.")])
    assert P.text_is_usable([block("中文文本也是正常的文字内容")])
    assert not P.text_is_usable([])
    assert not P.text_is_usable([block("\ufffd\ufffd\ufffd\ufffd ab")])  # replacement characters
    assert not P.text_is_usable([block("\ue000\ue001\ue002\ue003\ue004")])  # private use (broken font maps)
    assert not P.text_is_usable([block("!!! ### $$$ %%% &&&")])
    # NBSP-only text layers come out empty after whitespace normalization
    blocks, _ = P.blocks_from_dict({"blocks": [{"type": 0, "bbox": (0, 0, 1, 1), "lines": [
        {"bbox": (0, 0, 1, 1), "spans": [{"text": "\u00a0\u00a0\u00a0", "size": 10, "flags": 0}]}]}]}, 100, 10)
    assert blocks == [] and not P.text_is_usable(blocks)


def test_dense_page_analysis_is_bounded(tmp_path):
    path = S.write_dense_pdf(str(tmp_path / "dense.pdf"), chars=40_000, lines=4_000)
    limits = P.PdfLimits(max_page_chars=20_000, table_max_chars=8_000)
    doc = P.open_pdf(path, limits)
    start = time.perf_counter()
    content = P.read_page(P.load_page(doc, 0), limits)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed
    assert content.num_chars <= 20_000
    assert any("truncated" in w for w in content.warnings)
    assert any("table detection skipped" in w for w in content.warnings)
    # with a high character cap, the path cap still keeps the table finder away
    lax = P.PdfLimits(max_page_chars=100_000, table_max_chars=100_000, table_max_paths=1_000)
    content = P.read_page(P.load_page(doc, 0), lax)
    assert any("vector paths" in w for w in content.warnings)


def test_time_budget_interrupts_python_code():
    start = time.perf_counter()
    with pytest.raises(P.AnalysisTimeout):
        with P.time_budget(0.2):
            while True:
                sum(range(1000))
    assert time.perf_counter() - start < 2.0
    with P.time_budget(5.0):  # restores the previous handler and disarms the timer
        pass


def test_tables_outline_and_images_are_read(tmp_path):
    path = S.write_report_pdf(str(tmp_path / "r.pdf"), S.ReportSpec(seed=1))
    limits = P.PdfLimits()
    doc = P.open_pdf(path, limits)
    toc = P.read_toc(doc, doc.page_count, limits)
    assert [(e.level, e.title, e.page) for e in toc][:3] == [(1, "Synthetic Technical Report", 1),
                                                             (1, "1 Introduction", 2), (1, "2 Data and Methods", 4)]
    table_page = P.read_page(P.load_page(doc, 6), limits)  # "3 Results" opens with Table 1
    assert len(table_page.tables) == 1
    rows = table_page.tables[0].rows
    assert rows[0] == ["Region", "Q1", "Q2", "Q3", "Q4"] and len(rows) == 6
    figure_page = P.read_page(P.load_page(doc, 7), limits)
    assert len(figure_page.images) == 1


def _tesseract_ready() -> bool:
    return P.ocr_tessdata("eng") is not None


@pytest.mark.skipif(not _tesseract_ready(), reason="no Tesseract English data (apt-get install tesseract-ocr)")
def test_image_only_page_goes_through_ocr(tmp_path):
    path = S.write_image_only_pdf(str(tmp_path / "scan.pdf"), pages=1)
    no_ocr = process_document(_task(path), PoolConfig(output=str(tmp_path / "a"), min_pages=1))
    assert no_ocr["record"]["pages"][0]["source"] == "none"
    assert no_ocr["record"]["language"] == "unknown"
    cfg = PoolConfig(output=str(tmp_path / "b"), min_pages=1, ocr=True, ocr_dpi=150)
    record = process_document(_task(path), cfg)["record"]
    assert record["pages"][0]["source"] == "ocr"
    assert record["pages"][0]["num_chars"] > 200
    assert record["language"] == "en"
    from megatron_vlm.pool.records import DocRecord, load_blocks

    blocks = load_blocks(cfg.output, DocRecord.from_dict(record))[0]["blocks"]
    text = " ".join(b["text"] for b in blocks)
    assert "Document Analysis Group" in text
