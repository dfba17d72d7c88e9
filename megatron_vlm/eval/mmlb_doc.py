"""MMLongBench-Doc as originally released (github.com/mayubo2333/MMLongBench-Doc, ``data/``):
``samples.json`` + ``documents/*.pdf`` -> one evaluation set (``--data mmlb-doc:DIR``).

The release format (README "Dataset"; checked against ``data/samples.json``, 1082 records): a JSON
array of records with ``doc_id`` (the PDF's file name under ``documents/``), ``doc_type``,
``question``, ``answer`` (a string, also for lists: ``"['White', '10%']"``), ``evidence_pages``
(a *string* holding a list, ``"[3, 5]"``), ``evidence_sources`` (a string holding a Python list,
``"['Chart']"``) and ``answer_format`` (Str, Int, Float, List, None). Unanswerable questions have
``answer`` "Not answerable", ``answer_format`` None and, almost always, ``evidence_pages`` "[]";
they are kept as released and scored as MMLongBench scores them.

Evidence pages are 1-based page numbers of the PDF: the official runner (``run_api.py``) renders
``pdf[:max_pages]`` with PyMuPDF at 144 DPI and names page ``index`` as ``index + 1``, and in the
release 18 documents have evidence on their last page (page number == page count) while none is
referenced past its end except two annotation errors. A few records say page ``0`` or a page past
the end: they are dropped with reason ``evidence_page_out_of_range`` (named by file:line and doc_id).

Pages are rendered once by the pool's renderer (``pool/pdf.py``: :func:`open_pdf` under
:class:`PdfLimits`, :func:`render_page` at 144 DPI within the pixel cap, PNG) into a cache folder:
``CACHE/<pdf stem>/<pdf stem>_page<N>.png`` (N from 1), each file written atomically and a
``pages.json`` written last, which a later run reuses only when the PDF's SHA-256, the DPI and the
pixel cap match. The folder name is what MMLongBench's own prompt shows as the document id.

Every record that cannot be used is a :class:`Dropped` with ``file:line``, the ``doc_id`` and a
reason; a file none of whose records is usable is a :class:`DataError`. Records are not subsampled
(the release protocol asks every question; ``--limit`` caps them); ids are ``<name>_<index>``,
the record's 0-based position in the file.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from megatron_vlm.data.image_processing import image_token_count
from megatron_vlm.eval.data import DataConfig, DataError, DataSpec, DocPage, Document, Dropped, EvalExample, EvalSet
from megatron_vlm.eval.scoring import normalize_format

RELEASE_FIELDS = ("doc_id", "question", "answer", "evidence_pages", "answer_format")
DEFAULT_NAME = "mmlongdoc"  # MMLongBench's key for this dataset (the paper's MMLB-D column)
DEFAULT_DPI = 144.0  # the release's run_api.py --resolution default
MANIFEST = "pages.json"
OPTIONS = ("samples", "documents", "cache", "name", "dpi")


@dataclass
class RenderedDocument:
    doc_id: str  # the release's doc_id (PDF file name)
    folder: str  # the cache folder's name (the PDF's stem)
    sha256: str
    pages: list[tuple[int, str, int, int]]  # (1-based page, absolute PNG path, width, height)


# ------------------------------------------------------------------------- reading the release
def _records_with_lines(path: str) -> Iterator[tuple[int, Any]]:
    """(1-based line where the record starts, record) of a JSON array file (as released), or of a
    JSONL file; a file that is not valid JSON is a DataError naming the line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        from megatron_vlm.common.jsonl import iter_jsonl_lines

        for number, where, record in iter_jsonl_lines(path):
            yield number, record
        return
    decoder = json.JSONDecoder()
    i, line, counted = start + 1, 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); the release's samples.json is "
                            "one JSON array of records", "bad_file") from None
        yield line, record
        i = end
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise DataError(f"{path}:{line + text.count(chr(10), counted, i)}: expected ',' or ']' after a record",
                            "bad_file")


def parse_evidence_pages(value: Any) -> list[int]:
    """``"[3, 5]"`` (as released) or ``[3, 5]`` -> [3, 5]; anything else raises ValueError."""
    pages = json.loads(value) if isinstance(value, str) else value
    if not isinstance(pages, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pages):
        raise ValueError(f"evidence_pages {value!r} is not a list of page numbers like \"[3, 5]\"")
    return pages


def parse_evidence_sources(value: Any) -> Any:
    """``"['Chart', 'Table']"`` -> ['Chart', 'Table'] (a literal, never executed); kept as given
    when it is not one (the field is only reported)."""
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        return parsed if isinstance(parsed, list) else value
    return value


# ------------------------------------------------------------------------- rendering
def _folder_name(doc_id: str) -> str:
    stem = doc_id[:-4] if doc_id.lower().endswith(".pdf") else doc_id
    return stem or doc_id


def render_document(pdf_path: str, doc_id: str, cache_dir: str, dpi: float, limits=None) -> RenderedDocument:
    """Every page of one PDF as PNG in ``cache_dir/<stem>/``, reusing a complete earlier rendering
    of the same file at the same settings; raises ``pool.pdf.PdfRejected`` for a PDF the pool
    would refuse (too large, corrupt, encrypted, a page that does not render)."""
    from megatron_vlm.common.inputs import sha256_file
    from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json
    from megatron_vlm.pool import pdf as pdfmod

    limits = limits or pdfmod.PdfLimits()
    folder = _folder_name(doc_id)
    out = os.path.join(os.path.abspath(cache_dir), folder)
    digest = sha256_file(pdf_path)
    settings = {"sha256": digest, "dpi": float(dpi), "max_page_pixels": limits.max_page_pixels, "format": "png"}
    manifest = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("settings") == settings and all(os.path.isfile(os.path.join(out, p["image"]))
                                                     for p in saved.get("pages", [])):
            return RenderedDocument(doc_id, folder, digest, [(p["page"], os.path.join(out, p["image"]), p["width"],
                                                              p["height"]) for p in saved["pages"]])
    doc = pdfmod.open_pdf(pdf_path, limits)
    try:
        count = pdfmod.page_count(doc)
        if count < 1:
            raise pdfmod.PdfRejected("no_pages", "the PDF has no pages")
        pages = []
        for index in range(count):
            rendered = pdfmod.render_page(pdfmod.load_page(doc, index), dpi, limits)
            name = f"{folder}_page{index + 1}.png"
            atomic_write_bytes(os.path.join(out, name), pdfmod.encode_image(rendered, "png"))
            pages.append({"page": index + 1, "image": name, "width": rendered.width, "height": rendered.height,
                          "dpi": round(rendered.dpi, 3)})
    finally:
        doc.close()
    atomic_write_json(os.path.join(out, MANIFEST), {"doc_id": doc_id, "settings": settings, "pages": pages})
    return RenderedDocument(doc_id, folder, digest, [(p["page"], os.path.join(out, p["image"]), p["width"],
                                                      p["height"]) for p in pages])


def _document(rendered: RenderedDocument, cfg: DataConfig) -> Document:
    pages = [DocPage(n, path, image_token_count(h, w, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels))
             for n, path, w, h in rendered.pages]
    return Document(rendered.folder, pages, rendered.sha256)


# ------------------------------------------------------------------------- the reader
def _locate(spec: DataSpec) -> tuple[str, str]:
    """(samples.json, documents folder) from ``mmlb-doc:PATH`` (the release's data folder, or its
    samples file) and the ``samples=`` / ``documents=`` options."""
    path = spec.path
    if os.path.isdir(path):
        samples = spec.options.get("samples") or os.path.join(path, "samples.json")
        documents = spec.options.get("documents") or os.path.join(path, "documents")
    else:
        samples = spec.options.get("samples") or path
        documents = spec.options.get("documents") or os.path.join(os.path.dirname(os.path.abspath(path)), "documents")
    if not os.path.isfile(samples):
        raise DataError(f"--data mmlb-doc:{path}: {samples} does not exist; give the release's data folder "
                        "(holding samples.json and documents/) or its samples file")
    if not os.path.isdir(documents):
        raise DataError(f"--data mmlb-doc:{path}: the PDF folder {documents} does not exist; give it with "
                        ",documents=DIR")
    return samples, documents


def read_mmlb_doc(spec: DataSpec, cfg: DataConfig) -> list[EvalSet]:
    """The original MMLongBench-Doc release as one EvalSet (see the module docstring)."""
    from megatron_vlm.pool.pdf import PdfRejected

    unknown = sorted(set(spec.options) - set(OPTIONS))
    if unknown:
        raise DataError(f"--data mmlb-doc:{spec.path}: unknown option(s) {unknown}; allowed: {list(OPTIONS)}")
    samples, documents = _locate(spec)
    name = spec.options.get("name") or DEFAULT_NAME
    try:
        dpi = float(spec.options.get("dpi", DEFAULT_DPI))
    except ValueError:
        raise DataError(f"--data mmlb-doc:{spec.path}: dpi must be a number") from None
    if not dpi > 0:
        raise DataError(f"--data mmlb-doc:{spec.path}: dpi must be positive")
    cache = spec.options.get("cache") or cfg.cache_dir
    if not cache:
        raise DataError(f"--data mmlb-doc:{spec.path}: give a folder for the rendered pages with ,cache=DIR")
    cache = os.path.join(cache, f"mmlb_doc_{dpi:g}dpi") if not spec.options.get("cache") else cache
    out = EvalSet(name, [], info={"kind": "mmlb", "release": "mmlongbench-doc", "source": os.path.abspath(samples),
                                  "documents": os.path.abspath(documents), "page_cache": os.path.abspath(cache),
                                  "dpi": dpi})
    rendered: dict[str, Any] = {}  # doc_id -> RenderedDocument | Dropped (why the PDF is unusable)
    documents_root = os.path.realpath(documents)

    def document_of(doc_id: str):
        if doc_id not in rendered:
            pdf = os.path.realpath(os.path.join(documents_root, doc_id))
            if os.path.dirname(pdf) != documents_root:
                rendered[doc_id] = ("bad_record", f"doc_id {doc_id!r} is not a file name in {documents}")
            elif not os.path.isfile(pdf):
                rendered[doc_id] = ("missing_document", f"{pdf} does not exist (doc_id {doc_id!r})")
            else:
                try:
                    rendered[doc_id] = render_document(pdf, doc_id, cache, dpi)
                except PdfRejected as err:
                    rendered[doc_id] = (f"pdf_{err.reason}", f"{pdf}: {err.detail or err.reason} (doc_id {doc_id!r})")
        return rendered[doc_id]

    records = 0
    for index, (line, record) in enumerate(_records_with_lines(samples)):
        records += 1
        where = f"{samples}:{line}"
        if isinstance(record, json.JSONDecodeError):
            out.dropped.append(Dropped(name, where, "bad_record", f"not valid JSON ({record.msg})"))
            continue
        if isinstance(record, dict) and "doc_id" in record:
            where = f"{where} (doc_id {record['doc_id']})"
        missing = [k for k in RELEASE_FIELDS if k not in record] if isinstance(record, dict) else list(RELEASE_FIELDS)
        if missing:
            out.dropped.append(Dropped(name, where, "bad_record", f"missing field(s) {missing}"))
            continue
        doc_id = str(record["doc_id"])
        try:
            evidence = parse_evidence_pages(record["evidence_pages"])
        except (ValueError, TypeError) as err:
            out.dropped.append(Dropped(name, where, "bad_evidence_pages", str(err)))
            continue
        try:
            fmt = normalize_format(record["answer_format"])
        except ValueError as err:
            out.dropped.append(Dropped(name, where, "bad_answer_format", str(err)))
            continue
        doc = document_of(doc_id)
        if isinstance(doc, tuple):
            out.dropped.append(Dropped(name, where, doc[0], doc[1]))
            continue
        if doc.sha256 in cfg.exclude_hashes:
            out.dropped.append(Dropped(name, where, "in_training_pool",
                                       f"document {doc_id} is in a training pool (by SHA-256)"))
            continue
        count = len(doc.pages)
        outside = [p for p in evidence if not 1 <= p <= count]
        if outside:
            out.dropped.append(Dropped(name, where, "evidence_page_out_of_range",
                                       f"evidence page(s) {outside} outside 1..{count} of {doc_id} "
                                       "(evidence_pages are 1-based)"))
            continue
        meta = {"doc_name": doc.folder, "doc_id": doc_id, "evidence_sources":
                parse_evidence_sources(record.get("evidence_sources")), "line": line}
        if "doc_type" in record:
            meta["doc_type"] = record["doc_type"]
        out.examples.append(EvalExample(id=f"{name}_{index}", dataset=name, question=str(record["question"]),
                                        answer=record["answer"], answer_format=fmt, doc=_document(doc, cfg),
                                        evidence_pages=sorted(set(evidence)), meta=meta))
    out.info["records"] = records
    if not out.examples:
        reasons: dict[str, int] = {}
        for d in out.dropped:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
        first = f"; e.g. {out.dropped[0].where}: {out.dropped[0].detail}" if out.dropped else ""
        raise DataError(f"--data mmlb-doc:{spec.path}: none of the {records} records of {samples} is usable "
                        f"({reasons or 'the file is empty'}){first}", "no_usable_records")
    usable = {d.doc_id: d for d in rendered.values() if isinstance(d, RenderedDocument)}
    out.negatives = [_document(d, cfg) for _, d in sorted(usable.items())
                     if d.sha256 not in cfg.exclude_hashes]
    out.info["negatives"] = len(out.negatives)
    out.info["rendered_documents"] = len(usable)
    out.info["rendered_pages"] = sum(len(d.pages) for d in usable.values())
    return [out]


__all__ = ["DEFAULT_DPI", "DEFAULT_NAME", "RenderedDocument", "parse_evidence_pages", "parse_evidence_sources",
           "read_mmlb_doc", "render_document"]
