"""The document pool's on-disk schema: typed records for ``manifest.jsonl``, rejections in
``report.json``, and the per-document block files. The VQA-synthesis stage reads these; change
them here (and bump ``SCHEMA``) rather than ad hoc in writers.

Pool layout::

    POOL/manifest.jsonl                       one DocRecord per line, sorted by doc_id
    POOL/report.json                          counts + every rejected document (reason, path)
    POOL/stats.json                           Table-9-style statistics
    POOL/pool_config.json                     the settings every shard of this pool must share
    POOL/images/<id[:2]>/<id>/<page:04d>.jpg  rendered pages (1-based page numbers)
    POOL/blocks/<id[:2]>/<id>.json.gz         labelled layout blocks of every page
    POOL/shards/manifest-I-of-N.jsonl         per-shard records (append-only, resumable)
    POOL/shards/rejected-I-of-N.jsonl         per-shard rejections
    POOL/shards/done-I-of-N.json              shard completion marker (counts, timings)

Page numbers are 1-based everywhere. Block boxes are pixels of the stored page image.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

from megatron_vlm.pool.sections import Section
from megatron_vlm.common.storage import iter_jsonl, read_json_gz

SCHEMA = "megatron-vlm/doc-pool/v1"

REJECT_REASONS = (
    "unreadable",  # the file cannot be read (permissions, vanished)
    "too_large",  # file bytes over the limit
    "corrupt",  # not a PDF, broken beyond repair, truncated, pages that do not load
    "encrypted",  # needs a password to open
    "too_few_pages",  # below --min-pages (a 0-page document always)
    "too_many_pages",  # above --max-pages
    "duplicate",  # same SHA-256 as a document already in the pool
    "near_duplicate",  # same text layer (MinHash Jaccard >= 0.8) as a document earlier by path (merge)
    "contaminated",  # SHA-256 in the exclusion list (evaluation benchmarks)
    "broken_text_layer",  # too many pages whose text layer is not what they show, and no OCR for them
    "render_failure",  # a page does not render (or has an unusable size/aspect ratio)
    "timeout",  # over the per-document time limit: the worker was killed
    "crash",  # the worker died (memory limit, signal)
)
RETRYABLE = ("timeout", "crash")  # --retry-failed processes these again


@dataclass
class PageRecord:
    """One rendered page: its image and the visual tokens Qwen2.5-VL spends on it."""

    page: int  # 1-based
    image: str  # path relative to the pool folder
    width: int  # stored image, pixels
    height: int
    resized_width: int  # after Qwen2.5-VL smart_resize (max_pixels pinned): what the ViT sees
    resized_height: int
    tokens: int  # <|image_pad|> tokens = (resized_h / 28) * (resized_w / 28) (without vision_start/end)
    dpi: float  # DPI actually rendered at (below the requested one only for huge pages)
    source: str  # block source: "text" (text layer) | "ocr" | "none"
    num_blocks: int
    num_chars: int


@dataclass
class DocRecord:
    """One document of the pool (a line of ``manifest.jsonl``)."""

    doc_id: str  # first 16 hex digits of sha256: names the image and block folders
    source: str  # absolute path of the PDF
    sha256: str
    file_bytes: int
    num_pages: int
    language: str  # ISO 639-1, or "unknown"
    title: str
    total_tokens: int  # sum of the pages' tokens
    image_format: str
    dpi: float  # requested DPI
    section_source: str  # "toc" | "layout" | "pages"
    sections: list[Section]
    blocks: str  # block file, relative to the pool folder
    pages: list[PageRecord]
    warnings: list[str] = field(default_factory=list)
    schema: str = SCHEMA
    text_minhash: list[int] = field(default_factory=list)  # near_dup.text_minhash ([] = too little text)
    outline_ignored: str = ""  # why the PDF outline failed sections.check_outline ("" = used or none)
    # text_quality's verdict: status ok | ocr | dropped, broken pages and why, language-ID confidence
    # ({} in manifests written before the check existed)
    text_layer: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DocRecord":
        values = dict(data)
        values["sections"] = [Section.from_dict(s) for s in data["sections"]]
        values["pages"] = [PageRecord(**p) for p in data["pages"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Rejection:
    """A document that did not enter the pool, and why."""

    source: str
    reason: str
    detail: str = ""
    sha256: Optional[str] = None
    duplicate_of: Optional[str] = None  # duplicates: the source that was kept

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Rejection":
        return cls(**{k: data.get(k) for k in ("source", "reason", "detail", "sha256", "duplicate_of")})


def doc_id_for(sha256: str) -> str:
    return sha256[:16]


def image_relpath(doc_id: str, page: int, suffix: str) -> str:
    return f"images/{doc_id[:2]}/{doc_id}/{page:04d}.{suffix}"


def blocks_relpath(doc_id: str) -> str:
    return f"blocks/{doc_id[:2]}/{doc_id}.json.gz"


def read_manifest(pool_dir: str) -> Iterator[DocRecord]:
    """Stream the merged manifest of a pool."""
    for data in iter_jsonl(os.path.join(pool_dir, "manifest.jsonl")):
        yield DocRecord.from_dict(data)


def load_blocks(pool_dir: str, record: DocRecord) -> list[dict[str, Any]]:
    """The labelled blocks of a document: one dict per page with ``page``, ``source`` and
    ``blocks`` (each: ``label``, ``bbox`` [x0, y0, x1, y1] in image pixels, ``text``, and
    ``level`` for sections, ``rows`` for tables)."""
    return read_json_gz(os.path.join(pool_dir, record.blocks))["pages"]


__all__ = [
    "REJECT_REASONS",
    "RETRYABLE",
    "SCHEMA",
    "DocRecord",
    "PageRecord",
    "Rejection",
    "blocks_relpath",
    "doc_id_for",
    "image_relpath",
    "load_blocks",
    "read_manifest",
]
