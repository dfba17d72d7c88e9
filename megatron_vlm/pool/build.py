"""The document pool: PDFs -> rendered pages + labelled blocks + token counts, one typed record
per document, built by shards that resume and then merge into one manifest.

Flow of one shard (``run_shard``):

1. the shard's inputs (sorted paths, ``--shard I/N`` by path hash) minus those its manifest or
   rejection log already has (resume: a line in either is a document's completion marker);
2. SHA-256 of the rest; exclusion-list hits are ``contaminated``; for every hash only the
   smallest path is processed (the others are ``duplicate``), and a hash the shard already holds
   is a duplicate too;
3. every remaining document runs in a worker process with a time limit (``workers.run_tasks``):
   render each page at the DPI, encode and store it atomically, count its Qwen2.5-VL tokens with
   ``smart_resize`` (``megatron_vlm.data.image_processing``), read its text layer / OCR, tables
   and images, label blocks, derive sections and language, write the block file, and return the
   record; the parent appends it to the shard manifest (or the rejection to the shard's log);
4. a done marker; when every shard has one, the merge writes ``manifest.jsonl`` (sorted by
   ``doc_id``, duplicates across shards dropped), ``report.json`` and ``stats.json``.

Records hold nothing time- or machine-dependent, so a killed-and-resumed run yields the same
merged manifest, byte for byte, as a clean run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from megatron_vlm.data.image_processing import image_token_count, smart_resize
from megatron_vlm.pool import pdf as pdfmod
from megatron_vlm.common.inputs import select_shard, sha256_file
from megatron_vlm.pool.language import detect_language, identify_language, sample_text
from megatron_vlm.pool.layout import LAYOUT_METHODS, Block, label_document
from megatron_vlm.pool.near_dup import NearDuplicateFinder, text_minhash
from megatron_vlm.pool.pdf import IMAGE_SUFFIX, OcrSettings, PdfLimits, PdfRejected
from megatron_vlm.pool.records import (
    RETRYABLE,
    SCHEMA,
    DocRecord,
    PageRecord,
    Rejection,
    blocks_relpath,
    doc_id_for,
    image_relpath,
)
from megatron_vlm.pool.sections import check_outline, document_sections, join_lines
from megatron_vlm.pool import text_quality
from megatron_vlm.common.storage import (
    JsonlAppender,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_json_gz,
    dumps,
    read_jsonl,
)
from megatron_vlm.cli import step as cli_step
from megatron_vlm.common.workers import Outcome, run_tasks

MAX_WARNINGS = 50
# MuPDF messages that mean a page's content is missing, not merely odd
_DAMAGE = re.compile(r"cannot load content stream|object is not a stream|non-page object in page tree|"
                     r"cannot find object|premature end of data")


@dataclass
class PoolConfig:
    """Settings of a pool build. Those in ``OUTPUT_FIELDS`` shape the output and must be the same
    for every shard and rerun of a pool (checked against ``pool_config.json``)."""

    output: str
    dpi: float = 144.0
    min_pages: int = 20
    max_pages: int = 200
    image_format: str = "jpeg"
    image_quality: int = 85
    ocr: bool = False
    ocr_languages: str = "eng"
    ocr_max_pages: int = 50
    ocr_dpi: int = 200
    # pages whose text layer fails text_quality (mojibake, control characters): "ocr" reads them
    # with Tesseract in the script the check found (when its data is installed, within
    # ocr_max_pages), "reject" never; a document with more such pages left unread than
    # broken_text_max_share of its pages is rejected as broken_text_layer
    broken_text: str = "ocr"
    broken_text_max_share: float = 0.1
    tables: bool = True
    # block labels: "heuristic" (text-layer rules) or "model" (PyMuPDF's ONNX layout model); on 34
    # hand-labelled real pages (tools/bench/layout.py) the heuristics score macro F1 0.80 vs 0.67
    # at ~12x the model's pages/s, so they are the default
    layout: str = "heuristic"
    limits: PdfLimits = field(default_factory=PdfLimits)
    workers: int = max(1, os.cpu_count() or 1)
    doc_timeout: float = 600.0
    worker_memory_gb: float = 4.0
    retry_failed: bool = False
    progress: bool = True

    OUTPUT_FIELDS = ("dpi", "min_pages", "max_pages", "image_format", "image_quality", "ocr", "ocr_languages",
                     "ocr_max_pages", "ocr_dpi", "tables", "limits")

    def validate(self) -> "PoolConfig":
        if self.image_format not in IMAGE_SUFFIX:
            raise ValueError(f"image format must be one of {sorted(IMAGE_SUFFIX)}, got {self.image_format!r}")
        if self.layout not in LAYOUT_METHODS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUT_METHODS)}, got {self.layout!r}")
        if not 1 <= self.image_quality <= 100:
            raise ValueError("image quality must be in 1..100")
        if self.broken_text not in ("ocr", "reject"):
            raise ValueError(f"broken text layer policy must be ocr or reject, got {self.broken_text!r}")
        if not 0.0 <= self.broken_text_max_share < 1.0:
            raise ValueError(f"broken_text_max_share must be in [0, 1), got {self.broken_text_max_share}")
        if self.dpi <= 0 or self.min_pages < 0 or self.max_pages < max(1, self.min_pages):
            raise ValueError(f"bad page/DPI settings: dpi={self.dpi} min_pages={self.min_pages} "
                             f"max_pages={self.max_pages}")
        return self

    def output_settings(self) -> dict:
        values = {name: getattr(self, name) for name in self.OUTPUT_FIELDS}
        values["limits"] = asdict(self.limits)
        if self.layout != "heuristic":  # recorded only when not the default, so older pools still resume
            values["layout"] = self.layout
        if (self.broken_text, self.broken_text_max_share) != ("ocr", 0.1):  # likewise
            values["broken_text"] = self.broken_text
            values["broken_text_max_share"] = self.broken_text_max_share
        return {"schema": SCHEMA, **values}


@dataclass
class DocTask:
    """One document to process (what a worker receives)."""

    source: str
    sha256: str
    file_bytes: int

    @property
    def doc_id(self) -> str:
        return doc_id_for(self.sha256)


# ------------------------------------------------------------------------------ one document


def _has_eof_marker(path: str, tail: int = 4096) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - tail))
        return b"%%EOF" in f.read()


def _block_dict(block: Block, zoom: float) -> dict:
    out: dict[str, Any] = {"label": block.label, "bbox": [int(round(v * zoom)) for v in block.bbox], "text": block.text}
    if block.level is not None:
        out["level"] = block.level
    if block.rows is not None:
        out["rows"] = block.rows
    return out


def _document_title(labelled: Sequence[Sequence[Block]], metadata_title: str) -> str:
    for blocks in labelled[:2]:
        titles = [join_lines(b.text) for b in blocks if b.label == "title"]
        if titles:
            return " ".join(titles)[:300]
    return metadata_title


def remove_stale_temporaries(output: str, doc_id: str) -> None:
    """Delete half-written files a killed run left for this document (never trusted, only litter)."""
    image_dir = os.path.join(output, "images", doc_id[:2], doc_id)
    stale = glob.glob(os.path.join(image_dir, ".tmp-*"))
    stale += glob.glob(os.path.join(output, "blocks", doc_id[:2], f".tmp-*-{doc_id}.json.gz"))
    for path in stale:
        try:
            os.unlink(path)
        except OSError:
            pass


def remove_document_outputs(output: str, doc_id: str) -> None:
    """Delete a document's images and block file (after a rejection or a killed worker)."""
    shutil.rmtree(os.path.join(output, "images", doc_id[:2], doc_id), ignore_errors=True)
    try:
        os.unlink(os.path.join(output, blocks_relpath(doc_id)))
    except OSError:
        pass


def _check_page_count(num_pages: int, cfg: PoolConfig) -> None:
    if num_pages == 0:
        raise PdfRejected("too_few_pages", "the document has no pages")
    if num_pages < cfg.min_pages:
        raise PdfRejected("too_few_pages", f"{num_pages} pages < {cfg.min_pages}")
    if num_pages > cfg.max_pages:
        raise PdfRejected("too_many_pages", f"{num_pages} pages > {cfg.max_pages}")


def _ocr_settings(cfg: PoolConfig) -> Optional[OcrSettings]:
    if not cfg.ocr:
        return None
    tessdata = pdfmod.ocr_tessdata(cfg.ocr_languages)
    if tessdata is None:
        return None  # the shard run has warned once; pages without text keep source "none"
    return OcrSettings(languages=cfg.ocr_languages, dpi=cfg.ocr_dpi, max_pages=cfg.ocr_max_pages, tessdata=tessdata)


@functools.lru_cache(maxsize=64)
def _has_tessdata(languages: str) -> bool:
    return pdfmod.ocr_tessdata(languages) is not None


def _check_text_layer(doc, num_pages: int, cfg: PoolConfig, source: str) -> tuple[list, text_quality.BrokenPagePlan]:
    """Check every page's text layer before any rendering; reject the document when more of its
    pages are broken and cannot be OCR'd than ``broken_text_max_share`` allows."""
    checks = []
    for index in range(num_pages):
        try:
            text = pdfmod.page_text(pdfmod.load_page(doc, index))[: text_quality.MAX_CHECK_CHARS]
        except Exception:  # a page that fails here fails (and is reported) in the page loop
            text = ""
        checks.append(text_quality.check_page_text(text, _has_tessdata))
    plan = text_quality.plan_broken_pages(checks, cfg.broken_text, cfg.ocr_max_pages,
                                          cfg.ocr_languages if cfg.ocr else None, _has_tessdata)
    _reject_if_unreadable(plan.unrepaired, plan, checks, num_pages, cfg, source)
    return checks, plan


def _reject_if_unreadable(unrepaired: list[int], plan: text_quality.BrokenPagePlan, checks: list, num_pages: int,
                          cfg: PoolConfig, source: str) -> None:
    if len(unrepaired) <= int(cfg.broken_text_max_share * num_pages):
        return
    first = checks[unrepaired[0] - 1]
    reasons = Counter(r for n in plan.broken for r in checks[n - 1].reasons)
    advice = "; ".join(plan.advice) or "these pages were OCR'd but the OCR text failed the check too"
    raise PdfRejected("broken_text_layer",
                      f"{source}: text layer broken on {len(plan.broken)} of {num_pages} pages "
                      f"({text_quality.page_ranges(plan.broken)}; {dict(sorted(reasons.items()))}), "
                      f"{len(unrepaired)} cannot be read ({text_quality.page_ranges(unrepaired)}); "
                      f"page {unrepaired[0]}: {first.describe() or 'OCR text unusable'}. To do: {advice}")


def _text_layer_summary(checks: list, plan: text_quality.BrokenPagePlan, ocr_pages: list[int], dropped: list[int],
                        language_confidence: float, agreement: dict) -> dict:
    """The record's ``text_layer``: status ok | ocr (every broken page OCR'd) | dropped (some keep
    no blocks), the broken pages and why, how far the OCR of the rendered page agrees with the
    text layer and with its repair (``similarity`` of non-ASCII letter bigrams, first 10 OCR'd
    pages), and the document's language-ID confidence."""
    out: dict[str, Any] = {"status": "dropped" if dropped else ("ocr" if plan.broken else "ok"),
                           "language_confidence": language_confidence}
    if plan.broken:
        out["broken_pages"] = plan.broken
        out["ocr_pages"] = ocr_pages
        out["dropped_pages"] = dropped
        out["reasons"] = dict(sorted(Counter(r for n in plan.broken for r in checks[n - 1].reasons).items()))
        out["ocr_languages"] = sorted(set(plan.ocr.values()))
        out["examples"] = [dict(checks[n - 1].to_dict(), page=n) for n in plan.broken[:3]]
        out["ocr_agreement"] = {str(n): agreement[n] for n in sorted(agreement)[:10]}
    return out


def _process_page(doc, index: int, doc_id: str, cfg: PoolConfig, ocr: Optional[OcrSettings], ocr_budget: list[int],
                  timing: dict, text_broken: bool = False,
                  broken_ocr: Optional[OcrSettings] = None) -> tuple[PageRecord, pdfmod.PageContent]:
    """Render, count tokens, store the image, and read the content of page ``index`` (0-based)."""
    t0 = time.perf_counter()
    page = pdfmod.load_page(doc, index)
    rendered = pdfmod.render_page(page, cfg.dpi, cfg.limits)
    try:
        resized_h, resized_w = smart_resize(rendered.height, rendered.width)
        tokens = image_token_count(rendered.height, rendered.width)
    except ValueError as exc:  # aspect ratio over 200: the model cannot take this page
        raise PdfRejected("render_failure", f"page {index + 1}: {exc}") from exc
    t1 = time.perf_counter()
    image = image_relpath(doc_id, index + 1, IMAGE_SUFFIX[cfg.image_format])
    atomic_write_bytes(os.path.join(cfg.output, image), pdfmod.encode_image(rendered, cfg.image_format,
                                                                            cfg.image_quality))
    t2 = time.perf_counter()
    content = pdfmod.read_page(page, cfg.limits, ocr, ocr_budget, tables=cfg.tables, text_broken=text_broken,
                               broken_ocr=broken_ocr)
    t3 = time.perf_counter()
    for key, value in (("render", t1 - t0), ("encode", t2 - t1), ("parse", t3 - t2)):
        timing[key] = timing.get(key, 0.0) + value
    record = PageRecord(page=index + 1, image=image, width=rendered.width, height=rendered.height,
                        resized_width=resized_w, resized_height=resized_h, tokens=tokens,
                        dpi=round(rendered.dpi, 3), source=content.source, num_blocks=0, num_chars=content.num_chars)
    return record, content


def build_record(task: DocTask, cfg: PoolConfig, timing: Optional[dict] = None) -> DocRecord:
    """Process one PDF into a record (writing its images and block file), or raise PdfRejected."""
    pymupdf = pdfmod.import_pymupdf()
    timing = timing if timing is not None else {}
    doc = pdfmod.open_pdf(task.source, cfg.limits)
    try:
        num_pages = pdfmod.page_count(doc)
        _check_page_count(num_pages, cfg)
        if doc.is_repaired and not _has_eof_marker(task.source):
            raise PdfRejected("corrupt", "truncated: broken cross-reference table and no %%EOF at the end")
        doc_id = task.doc_id
        t0 = time.perf_counter()
        checks, plan = _check_text_layer(doc, num_pages, cfg, task.source)
        timing["text_check"] = timing.get("text_check", 0.0) + time.perf_counter() - t0
        remove_stale_temporaries(cfg.output, doc_id)
        ocr, ocr_budget = _ocr_settings(cfg), [cfg.ocr_max_pages - len(plan.ocr)]
        pages, contents, damaged, warnings = [], [], [], []
        ocr_pages, dropped, agreement = [], list(plan.unrepaired), {}
        pymupdf.TOOLS.reset_mupdf_warnings()
        for index in range(num_pages):
            broken_ocr = None
            if index + 1 in plan.ocr:
                broken_ocr = OcrSettings(languages=plan.ocr[index + 1], dpi=cfg.ocr_dpi, max_pages=cfg.ocr_max_pages,
                                         tessdata=pdfmod.ocr_tessdata(plan.ocr[index + 1]))
            record, content = _process_page(doc, index, doc_id, cfg, ocr, ocr_budget, timing,
                                            text_broken=checks[index].broken, broken_ocr=broken_ocr)
            if broken_ocr is not None:  # OCR output is checked like a text layer
                ocr_text = "\n".join(b.text for b in content.blocks)
                if content.source == "ocr" and not text_quality.check_page_text(ocr_text).broken:
                    ocr_pages.append(index + 1)
                    check = checks[index]
                    agreement[index + 1] = {"text_layer": text_quality.similarity(check.text, ocr_text, True)}
                    if check.repair is not None:
                        agreement[index + 1]["repaired"] = text_quality.similarity(check.repaired_text, ocr_text, True)
                    if agreement[index + 1]["text_layer"] >= 0.5:
                        warnings.append(f"page {index + 1}: text layer flagged ({check.describe()}) but the OCR of "
                                        f"the page agrees with it ({agreement[index + 1]['text_layer']:.2f}); "
                                        "the OCR text is used")
                else:
                    content.blocks, content.source, content.num_chars = [], "none", 0
                    record.source, record.num_chars = "none", 0
                    dropped.append(index + 1)
            if _DAMAGE.search(pymupdf.TOOLS.mupdf_warnings(reset=True) or ""):
                damaged.append(index + 1)
            warnings.extend(f"page {index + 1}: {w}" for w in content.warnings)
            pages.append(record)
            contents.append(content)
        if damaged and (doc.is_repaired or len(damaged) > max(1, num_pages // 10)):
            raise PdfRejected("corrupt", f"content missing on {len(damaged)} page(s), e.g. page {damaged[0]}")
        dropped.sort()
        _reject_if_unreadable(dropped, plan, checks, num_pages, cfg, task.source)
        if plan.broken:
            warnings.insert(0, f"text layer broken on pages {text_quality.page_ranges(plan.broken)} "
                               f"({checks[plan.broken[0] - 1].describe()}): OCR'd "
                               f"{text_quality.page_ranges(ocr_pages) or 'none'} "
                               f"with {'/'.join(sorted(set(plan.ocr.values()))) or '-'}, no blocks on "
                               f"{text_quality.page_ranges(dropped) or 'none'}")

        t0 = time.perf_counter()
        toc = pdfmod.read_toc(doc, num_pages, cfg.limits)
        outline_ignored = check_outline(toc, ["\n".join(b.text for b in c.blocks) for c in contents], num_pages) or ""
        if outline_ignored:  # a broken outline neither labels headings nor defines sections
            warnings.insert(0, f"outline ignored: {outline_ignored}")
            toc = []
        metadata_title = pdfmod.metadata_title(doc)
        pdf_pages = [doc.load_page(i) for i in range(num_pages)] if cfg.layout == "model" else None
        labelled = label_document(contents, toc, metadata_title, method=cfg.layout, pdf_pages=pdf_pages)
        sections = document_sections(toc, labelled, num_pages)
        body = sample_text(b.text for blocks in labelled for b in blocks
                           if b.label in ("paragraph", "list", "caption", "section", "title"))
        language = detect_language(body)
        language_confidence = identify_language(body)[1] if language != "unknown" else 0.0
        page_blocks = []
        for record, content, blocks in zip(pages, contents, labelled):
            record.num_blocks = len(blocks)
            zoom = record.width / content.width  # points -> stored-image pixels
            page_blocks.append({"page": record.page, "source": content.source, "width": record.width,
                                "height": record.height, "blocks": [_block_dict(b, zoom) for b in blocks]})
        blocks_file = blocks_relpath(doc_id)
        atomic_write_json_gz(os.path.join(cfg.output, blocks_file),
                             {"schema": SCHEMA, "doc_id": doc_id, "pages": page_blocks})
        timing["layout"] = timing.get("layout", 0.0) + time.perf_counter() - t0
        return DocRecord(
            doc_id=doc_id, source=task.source, sha256=task.sha256, file_bytes=task.file_bytes,
            num_pages=num_pages, language=language, title=_document_title(labelled, metadata_title),
            total_tokens=sum(p.tokens for p in pages), image_format=cfg.image_format, dpi=float(cfg.dpi),
            section_source=sections[0].source if sections else "pages", sections=sections, blocks=blocks_file,
            pages=pages, warnings=warnings[:MAX_WARNINGS], outline_ignored=outline_ignored,
            text_minhash=text_minhash(b.text for c in contents for b in c.blocks),
            text_layer=_text_layer_summary(checks, plan, ocr_pages, dropped, language_confidence, agreement),
        )
    finally:
        doc.close()


_WORKER_CONFIG: Optional[PoolConfig] = None


def _init_worker(cfg: PoolConfig) -> None:
    global _WORKER_CONFIG
    _WORKER_CONFIG = cfg
    pdfmod.import_pymupdf()
    detect_language("warm up: load the language model once per worker, not inside a timed document")


def process_document(task: DocTask, cfg: Optional[PoolConfig] = None) -> dict:
    """Worker entry: ``{"record": ...}`` or ``{"rejected": ...}``, plus stage timings."""
    cfg = cfg or _WORKER_CONFIG
    assert cfg is not None, "process_document needs a PoolConfig (or a worker initialized with one)"
    timing: dict = {}
    try:
        record = build_record(task, cfg, timing)
        return {"record": record.to_dict(), "timing": timing}
    except PdfRejected as rejected:
        remove_document_outputs(cfg.output, task.doc_id)
        rejection = Rejection(task.source, rejected.reason, rejected.detail, task.sha256)
        return {"rejected": rejection.to_dict(), "timing": timing}


# ---------------------------------------------------------------------------------- a shard


def shard_paths(output: str, index: int, count: int) -> dict[str, str]:
    base = os.path.join(output, "shards")
    tag = f"{index}-of-{count}"
    return {"manifest": os.path.join(base, f"manifest-{tag}.jsonl"),
            "rejected": os.path.join(base, f"rejected-{tag}.jsonl"),
            "done": os.path.join(base, f"done-{tag}.json")}


def check_pool_config(cfg: PoolConfig) -> None:
    """Write ``pool_config.json`` on first use; refuse to mix settings into an existing pool."""
    path = os.path.join(cfg.output, "pool_config.json")
    wanted = cfg.output_settings()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = json.load(f)
        if existing != json.loads(dumps(wanted)):
            from megatron_vlm.cli import settings_diff

            diff = settings_diff(existing, json.loads(dumps(wanted)))
            raise ValueError(f"{cfg.output} was built with other settings ({diff}); "
                             f"use a new --output or the same settings (see {path})")
        return
    atomic_write_json(path, wanted)


@dataclass
class ShardResult:
    """What one shard run did (printed by the CLI, saved in the done marker)."""

    index: int
    count: int
    inputs: int
    resumed: int  # already finished in an earlier run
    accepted: int = 0
    rejected: int = 0
    pages: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="doc", dynamic_ncols=True, file=sys.stderr)


def _hash_all(paths: Sequence[str], threads: int, progress: bool) -> dict[str, Any]:
    """path -> (sha256, size) or the OSError that stopped reading it."""

    def one(path: str):
        try:
            return path, (sha256_file(path), os.path.getsize(path))
        except OSError as exc:
            return path, exc

    out: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for path, value in _progress(pool.map(one, paths), len(paths), "hashing", progress and len(paths) > 50):
            out[path] = value
    return out


def plan_shard(paths: Sequence[str], done: set[str], held: dict[str, str], exclude: frozenset,
               hashes: dict[str, Any]) -> tuple[list[DocTask], list[Rejection]]:
    """Split a shard's unfinished paths into tasks and immediate rejections (deterministically:
    among equal hashes the smallest path is processed)."""
    tasks: list[DocTask] = []
    rejections: list[Rejection] = []
    by_sha: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        if path in done:
            continue
        value = hashes[path]
        if isinstance(value, OSError):
            rejections.append(Rejection(path, "unreadable", f"{type(value).__name__}: {value}"))
        else:
            by_sha[value[0]].append(path)
    for sha, group in sorted(by_sha.items(), key=lambda kv: min(kv[1])):
        group.sort()
        if sha in exclude:
            rejections.extend(Rejection(p, "contaminated", "SHA-256 in the exclusion list", sha) for p in group)
            continue
        keep = held.get(sha)
        if keep is None:
            keep = group[0]
            tasks.append(DocTask(source=keep, sha256=sha, file_bytes=hashes[keep][1]))
        rejections.extend(Rejection(p, "duplicate", "same SHA-256 as another document", sha, duplicate_of=keep)
                          for p in group if p != keep)
    tasks.sort(key=lambda t: t.source)
    return tasks, rejections


def _outcome_to_result(task: DocTask, outcome: Outcome) -> dict:
    if outcome.status == "ok":
        return outcome.value
    reason = {"timeout": "timeout", "crash": "crash"}.get(outcome.status, "render_failure")
    return {"rejected": Rejection(task.source, reason, outcome.detail[:500], task.sha256).to_dict()}


def run_shard(
    inputs: Sequence[str],
    cfg: PoolConfig,
    shard: tuple[int, int] = (0, 1),
    exclude: Iterable[str] = (),
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> ShardResult:
    """Process this shard's share of ``inputs`` into ``cfg.output`` (resuming a previous run)."""
    cfg.validate()
    start = time.monotonic()
    index, count = shard
    os.makedirs(cfg.output, exist_ok=True)
    check_pool_config(cfg)
    files = shard_paths(cfg.output, index, count)
    if os.path.exists(files["done"]):
        os.unlink(files["done"])  # this shard is not done until this run says so

    paths = select_shard(sorted(set(inputs)), index, count)
    records = read_jsonl(files["manifest"], repair=True, keys=("source", "sha256"))
    old_rejections = read_jsonl(files["rejected"], repair=True, keys=("source", "reason"))
    done = {r["source"] for r in records}
    done |= {r["source"] for r in old_rejections if not (cfg.retry_failed and r.get("reason") in RETRYABLE)}
    held = {r["sha256"]: r["source"] for r in records}
    todo = [p for p in paths if p not in done]
    result = ShardResult(index=index, count=count, inputs=len(paths), resumed=len(paths) - len(todo))
    if result.resumed:
        log(f"shard {index}/{count}: {result.resumed} of {len(paths)} documents already done, resuming")

    hashes = _hash_all(todo, threads=min(8, 2 * max(1, cfg.workers)), progress=cfg.progress)
    tasks, early = plan_shard(todo, done, held, frozenset(x.lower() for x in exclude), hashes)
    reasons: Counter = Counter()
    timing: Counter = Counter()
    with JsonlAppender(files["manifest"]) as manifest, JsonlAppender(files["rejected"]) as rejected_log:
        for rejection in early:
            rejected_log.append(rejection.to_dict())
            reasons[rejection.reason] += 1
        if cfg.ocr and pdfmod.ocr_tessdata(cfg.ocr_languages) is None:
            log(f"warning: --ocr given but Tesseract language data for {cfg.ocr_languages!r} was not found "
                "(apt-get install tesseract-ocr); pages without text get no blocks")
        outcomes = run_tasks(
            tasks, process_document, workers=cfg.workers, timeout=cfg.doc_timeout,
            initializer=_init_worker, initargs=(cfg,), memory_bytes=int(cfg.worker_memory_gb * 2**30),
        )
        bar = _progress(outcomes, len(tasks), f"shard {index}/{count}", cfg.progress)
        for task, outcome in bar:
            cli_step()  # tests only: MVLM_TEST_SLOW_STEP
            value = _outcome_to_result(task, outcome)
            timing.update(value.get("timing", {}))
            if "record" in value:
                text_layer = value["record"].get("text_layer") or {}
                if text_layer.get("status", "ok") != "ok":
                    line = next((w for w in value["record"]["warnings"] if w.startswith("text layer broken")), "")
                    log(f"warning: {task.source}: {line}")
                manifest.append(value["record"])
                result.accepted += 1
                result.pages += value["record"]["num_pages"]
            else:
                if outcome.status != "ok":
                    remove_document_outputs(cfg.output, task.doc_id)
                rejected_log.append(value["rejected"])
                reasons[value["rejected"]["reason"]] += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(ok=result.accepted, rejected=sum(reasons.values()), pages=result.pages, refresh=False)
    result.rejected = sum(reasons.values())
    result.reasons = dict(sorted(reasons.items()))
    result.timing = {k: round(v, 3) for k, v in sorted(timing.items())}
    result.seconds = round(time.monotonic() - start, 3)
    atomic_write_json(files["done"], asdict(result))
    return result


# ------------------------------------------------------------------------------------ merge


def shards_done(output: str, count: int) -> list[int]:
    """Indices of shards (of ``count``) that have not finished."""
    return [i for i in range(count) if not os.path.exists(shard_paths(output, i, count)["done"])]


def merge_pool(output: str, count: int, require_complete: bool = True) -> dict:
    """Merge shard manifests into ``manifest.jsonl`` (sorted by doc_id; duplicates across shards
    dropped, keeping the smallest path; near duplicates by text (``near_dup``) dropped, keeping the
    first by path), and write ``report.json`` and ``stats.json``.

    Streams: only a small summary per document is held in memory; record lines are copied
    verbatim from the shard files, so the merged bytes equal the shards' bytes.
    """
    missing = shards_done(output, count)
    if require_complete and missing:
        raise RuntimeError(f"shards not finished: {missing} of {count}")
    entries = []  # (doc_id, sha256, source, shard, offset, length, summary, MinHash signature)
    rejections: dict[str, dict] = {}
    for i in range(count):
        files = shard_paths(output, i, count)
        if os.path.exists(files["manifest"]):
            offset = 0
            with open(files["manifest"], "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        break
                    summary = (rec["num_pages"], rec["language"], rec["total_tokens"], rec.get("section_source", ""),
                               tuple(Counter(p["source"] for p in rec["pages"]).items()),
                               bool(rec.get("outline_ignored")), (rec.get("text_layer") or {}).get("status", "ok"))
                    entries.append((rec["doc_id"], rec["sha256"], rec["source"], i, offset, len(raw), summary,
                                    _signature(rec.get("text_minhash"))))
                    offset += len(raw)
        for rej in read_jsonl(files["rejected"]):
            rejections[rej["source"]] = rej  # the latest word on a path wins (--retry-failed)
    kept: dict[str, tuple] = {}
    for entry in sorted(entries, key=lambda e: (e[1], e[2])):
        if entry[1] in kept:
            rejections[entry[2]] = Rejection(entry[2], "duplicate", "same SHA-256 as another document", entry[1],
                                             duplicate_of=kept[entry[1]][2]).to_dict()
        else:
            kept[entry[1]] = entry
    accepted_sources = {e[2] for e in kept.values()}
    rejections = {s: r for s, r in rejections.items() if s not in accepted_sources}
    finder = NearDuplicateFinder()  # same text, other bytes: the first by path is kept
    by_source = {e[2]: e for e in kept.values()}
    for source in sorted(by_source):
        entry = by_source[source]
        match = finder.add(source, entry[7])
        if match is not None:
            keeper = by_source[match[0]]
            rejections[source] = Rejection(
                source, "near_duplicate", f"estimated Jaccard similarity {match[1]:.3f} >= {finder.threshold} "
                f"with doc_id {keeper[0]} (text layer, MinHash)", entry[1], duplicate_of=keeper[2]).to_dict()
            del kept[entry[1]]
    ordered = sorted(kept.values(), key=lambda e: (e[0], e[1], e[2]))

    _copy_lines(output, count, [(e[3], e[4], e[5]) for e in ordered], os.path.join(output, "manifest.jsonl"))

    rejected_list = sorted(rejections.values(), key=lambda r: r["source"])
    stats = pool_stats([e[6] for e in ordered], rejected_list)
    stats["near_duplicates"] = finder.stats()
    report = {
        "schema": SCHEMA,
        "shards": count,
        "counts": {"inputs": stats["documents"] + len(rejected_list), "accepted": stats["documents"],
                   "rejected": len(rejected_list), "rejected_by_reason": stats["rejected_by_reason"]},
        "near_duplicates": stats["near_duplicates"],
        "text_layers": stats["text_layers"],  # accepted documents: ok / ocr / dropped (text_quality)
        "rejected": rejected_list,
    }
    atomic_write_json(os.path.join(output, "report.json"), report)
    atomic_write_json(os.path.join(output, "stats.json"), stats)
    return stats


def _signature(values) -> Any:
    """A record's MinHash signature, compact in memory (merge holds one per document)."""
    if not values:
        return ()
    import numpy as np

    return np.asarray(values, dtype=np.uint64)


def _copy_lines(output: str, count: int, spans: Sequence[tuple[int, int, int]], target: str) -> None:
    """Write the given (shard, offset, length) line spans, in order, to ``target`` atomically."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(target), dir=os.path.dirname(target))
    handles: dict[int, Any] = {}
    try:
        with os.fdopen(fd, "wb") as out:
            for shard, offset, length in spans:
                if shard not in handles:
                    handles[shard] = open(shard_paths(output, shard, count)["manifest"], "rb")
                handles[shard].seek(offset)
                out.write(handles[shard].read(length))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        for handle in handles.values():
            handle.close()


def pool_stats(summaries: Sequence[tuple], rejected: Sequence[dict]) -> dict:
    """Table-9-style statistics from (num_pages, language, tokens, section_source, page sources[,
    outline ignored[, text layer status]])."""
    pages = [s[0] for s in summaries]
    tokens = [s[2] for s in summaries]
    languages = Counter(s[1] for s in summaries)
    sources: Counter = Counter()
    for s in summaries:
        sources.update(dict(s[4]))
    n = len(summaries)
    return {
        "documents": n,
        "page_range": [min(pages), max(pages)] if pages else [0, 0],
        "avg_pages": round(sum(pages) / n, 2) if n else 0.0,
        "total_pages": sum(pages),
        "total_tokens": sum(tokens),
        "token_range": [min(tokens), max(tokens)] if tokens else [0, 0],
        "avg_tokens_per_page": round(sum(tokens) / max(sum(pages), 1), 1),
        "languages": {lang: {"documents": c, "percent": round(100.0 * c / n, 2)}
                      for lang, c in sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))},
        "page_block_sources": dict(sorted(sources.items())),
        "section_sources": dict(sorted(Counter(s[3] for s in summaries).items())),
        "outlines_ignored": sum(1 for s in summaries if len(s) > 5 and s[5]),  # failed check_outline
        # text_quality: ok, ocr (broken pages OCR'd), dropped (some broken pages keep no blocks)
        "text_layers": dict(sorted(Counter(s[6] if len(s) > 6 else "ok" for s in summaries).items())),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
    }


_LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish",
                   "ja": "Japanese", "ru": "Russian", "unknown": "Unknown"}


def format_stats(stats: dict) -> str:
    """The statistics as a small table, laid out like the paper's Table 9."""
    rows = [
        ("Corpus scale", "Number of documents", f"{stats['documents']:,}"),
        ("", "Page-count range", f"[{stats['page_range'][0]}, {stats['page_range'][1]}]"),
        ("", "Average pages", f"{stats['avg_pages']:.2f}"),
        ("", "Total pages", f"{stats['total_pages']:,}"),
        ("", "Total visual tokens", f"{stats['total_tokens']:,}"),
    ]
    first = True
    for lang, entry in stats["languages"].items():
        name = _LANGUAGE_NAMES.get(lang, lang)
        share = f"{entry['documents']:,} ({entry['percent']:.2f}%)"
        rows.append(("Lang." if first else "", f"{name} documents", share))
        first = False
    broken = {k: v for k, v in stats.get("text_layers", {}).items() if k != "ok"}
    if broken:
        rows.append(("Text layer", "Broken: OCR'd / pages dropped",
                     f"{broken.get('ocr', 0):,} / {broken.get('dropped', 0):,}"))
    rows.append(("Rejected", "Documents", f"{stats['rejected']:,}"))
    for reason, c in stats["rejected_by_reason"].items():
        rows.append(("", reason, f"{c:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


__all__ = [
    "DocTask",
    "PoolConfig",
    "ShardResult",
    "build_record",
    "check_pool_config",
    "format_stats",
    "merge_pool",
    "plan_shard",
    "pool_stats",
    "process_document",
    "remove_document_outputs",
    "remove_stale_temporaries",
    "run_shard",
    "shard_paths",
    "shards_done",
]
