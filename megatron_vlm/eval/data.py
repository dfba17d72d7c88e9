"""Evaluation data: what an example is, and the readers that produce examples.

Sources (``--data SPEC``; ``KIND:PATH[,key=value...]``):

* ``mmlb:DIR_OR_FILE,images=IMAGE_DIR`` -- MMLongBench document-QA JSONL as published
  (``documentQA/{longdocurl,mmlongdoc,slidevqa}_K{8,...,128}.jsonl``: ``question``, ``answer``,
  ``answer_format``, ``doc_name``, ``page_list`` (image paths under ``IMAGE_DIR``, the document
  is the parent folder), ``ans_page_list``). Each file is one dataset at one length; lengths
  without a file are built from the longest instance below them (or trimmed from the document).
  ``evidence_offset=official|auto|0|1``: added to ``ans_page_list`` (0-based) to get the page
  numbers in the image names. ``official`` (the default) is MMLongBench's own statement per dataset
  (:data:`OFFICIAL_EVIDENCE_OFFSET`); ``auto`` picks the offset under which more evidence pages exist.
  Records are chosen as MMLongBench's loader chooses them (``DataConfig.max_test_samples``,
  ``--max-test-samples``, default 100): in each (dataset, length) file separately, a seeded
  permutation of the file's records and its first N (:func:`official_selection`). An example is
  evaluated at a length that has a file only if that file picked it; at a length without a file,
  only if the file it is built from (the longest below, else the shortest) picked it.
* ``mmlb-doc:DIR[,documents=DIR][,cache=DIR][,name=mmlongdoc][,dpi=144]`` -- MMLongBench-Doc as
  originally released (``samples.json`` + ``documents/*.pdf``), pages rendered once by the pool's
  renderer into a cache; see :mod:`megatron_vlm.eval.mmlb_doc`.
* ``samples:FILE.jsonl[,pool=POOL][,negatives=POOL][,name=NAME]`` -- our held-out sets in the
  shared Sample format (``data/samples.py``) with ``meta`` holding ``answer``, ``answer_format``,
  ``evidence_pages`` (1-based pages of ``meta.doc_id``). With ``pool=`` the whole gold document
  comes from the pool; negatives come from ``negatives=`` (default: the same pool; a context never
  pads with its own gold document).
* ``niah:POOL[,kinds=text/image][,depths=0/0.25/0.5/0.75/1][,repeats=1]`` -- needle-in-a-haystack
  suite built from a pool: a fact sentence or a small picture with a number placed at a given
  depth among pool pages (datasets ``niah-text`` and ``niah-image``).
* ``mmlb-niah:NIAH_DIR,images=IMAGE_DIR`` -- MMLongBench's standardised MM-NIAH files as published,
  read, chosen, prompted and scored as the official run does (``eval/mmniah.py``).

Every record that cannot be used is kept as a :class:`Dropped` with file, line and reason.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from megatron_vlm.common.jsonl import iter_jsonl_lines
from megatron_vlm.data.image_processing import MAX_PIXELS, MIN_PIXELS, image_token_count
from megatron_vlm.eval.scoring import normalize_format

# ------------------------------------------------------------------------- the data model


@dataclass
class DocPage:
    """One page image of a document; ``tokens`` are its ``<|image_pad|>`` tokens."""

    page: int  # page number in its document: 1-based; MMLongBench files: the number in the image name
    image: str  # absolute path
    tokens: int


@dataclass
class Document:
    doc_id: str
    pages: list[DocPage]
    sha256: Optional[str] = None

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pages)


@dataclass(slots=True)
class ContextItem:
    """One piece of an instantiated context, in prompt order (slots: a 512K run holds millions)."""

    kind: str  # "page" (labelled page image) | "text" (a needle sentence) | "image" (a needle picture)
    doc_id: str = ""
    page: int = 0
    image: Optional[str] = None
    tokens: int = 0  # <|image_pad|> tokens of the image
    text: Optional[str] = None
    role: str = "gold"  # gold | negative | needle

    @classmethod
    def from_page(cls, doc_id: str, page: DocPage, role: str) -> "ContextItem":
        return cls("page", doc_id, page.page, page.image, page.tokens, None, role)

    def to_dict(self) -> dict:
        values = {name: getattr(self, name) for name in self.__slots__}
        return {k: v for k, v in values.items() if v not in (None, "") or k == "kind"}


@dataclass
class Needle:
    kind: str  # "text" | "image"
    depth: float  # 0 = before the first page, 1 = after the last
    text: Optional[str] = None
    image: Optional[str] = None
    tokens: int = 0

    def item(self) -> ContextItem:
        if self.kind == "text":
            return ContextItem("text", text=self.text, role="needle")
        return ContextItem("image", image=self.image, tokens=self.tokens, role="needle")


@dataclass
class EvalExample:
    id: str
    dataset: str
    question: str
    answer: Any
    answer_format: str  # String | Integer | Float | List | None
    task: str = "docqa"  # docqa | niah
    doc: Optional[Document] = None  # the gold document (as complete as the source knows it)
    evidence_pages: list[int] = field(default_factory=list)  # 1-based pages of ``doc``
    published: dict[int, list[ContextItem]] = field(default_factory=dict)  # MMLongBench: length -> pages
    needle: Optional[Needle] = None
    meta: dict[str, Any] = field(default_factory=dict)
    # MMLongBench's per-file choice: {"files": lengths with a file, "picked": those that chose it}
    selection: Optional[dict[str, list[int]]] = None

    def evaluated_at(self, length: int) -> bool:
        """Whether the official per-file record choice keeps this example at ``length``."""
        if self.task == "mmniah":  # MM-NIAH: only at the lengths of its files, nothing is built
            return length in self.published
        if not self.selection or not self.selection["files"]:
            return True
        files = self.selection["files"]
        ref = length if length in files else max((f for f in files if f <= length), default=min(files))
        return ref in self.selection["picked"]


@dataclass
class Dropped:
    dataset: str
    where: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EvalSet:
    """One dataset: its examples, the documents it may pad with, and what was dropped."""

    name: str
    examples: list[EvalExample]
    negatives: list[Document] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    max_pixels: int = MAX_PIXELS
    min_pixels: int = MIN_PIXELS
    limit: Optional[int] = None  # examples per dataset (the first ones, in file order)
    seed: int = 0
    max_test_samples: Optional[int] = 100  # MMLongBench records per (dataset, length) file (None: all)
    selection_seed: int = 42  # the official --seed default (MMLongBench arguments.py)
    mmniah_max_test_samples: Optional[int] = 50  # MM-NIAH records per file (configs/mm_niah_*_all.yaml)
    work_dir: Optional[str] = None  # where generated needle images go
    cache_dir: Optional[str] = None  # where PDFs of an mmlb-doc release are rendered (next to the output)
    exclude_hashes: frozenset = frozenset()  # SHA-256 of training documents: never evaluate on them


class DataError(ValueError):
    """Input that cannot be used; the message says where and what to do, ``reason`` is the
    short key it is counted under in the report."""

    def __init__(self, message: str, reason: str = "bad_input"):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------- specs
@dataclass
class DataSpec:
    kind: str
    path: str
    options: dict[str, str]


KINDS = ("mmlb", "samples", "niah", "mmlb-niah", "mmlb-doc")


def parse_data_spec(spec: str) -> DataSpec:
    """``KIND:PATH[,key=value...]`` (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        raise DataError(f"--data {spec!r}: expected KIND:PATH[,key=value...] with KIND one of {KINDS}, "
                        "e.g. mmlb:mmlb_data/documentQA,images=mmlb_image or samples:heldout.jsonl,pool=POOL")
    parts = rest.split(",")
    path, options = parts[0], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DataError(f"--data {spec!r}: option {part!r} is not key=value")
        options[key.strip()] = value.strip()
    if not path:
        raise DataError(f"--data {spec!r}: no path")
    return DataSpec(kind, path, options)


def _check_options(spec: DataSpec, allowed: Sequence[str]) -> None:
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise DataError(f"--data {spec.kind}:{spec.path}: unknown option(s) {unknown}; allowed: {list(allowed)}")


def load_data(spec_text: str, cfg: DataConfig) -> list[EvalSet]:
    spec = parse_data_spec(spec_text)
    if spec.kind == "mmlb":
        sets = read_mmlongbench(spec, cfg)
    elif spec.kind == "samples":
        sets = [read_samples_set(spec, cfg)]
    elif spec.kind == "mmlb-doc":
        from megatron_vlm.eval.mmlb_doc import read_mmlb_doc
        sets = read_mmlb_doc(spec, cfg)
    elif spec.kind == "mmlb-niah":
        from megatron_vlm.eval.mmniah import read_mmniah
        sets = read_mmniah(spec, cfg)
    else:
        sets = build_niah_sets(spec, cfg)
    for s in sets:
        if cfg.limit is not None and len(s.examples) > cfg.limit:
            s.info["limited_from"] = len(s.examples)
            s.examples = s.examples[:cfg.limit]
    return sets


# ------------------------------------------------------------------------- image sizes
_SIZE_CACHE: dict[str, tuple[int, int]] = {}


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the image header (no decoding); cached."""
    if path not in _SIZE_CACHE:
        from PIL import Image

        with Image.open(path) as im:
            _SIZE_CACHE[path] = im.size
    return _SIZE_CACHE[path]


def page_tokens(path: str, cfg: DataConfig) -> int:
    width, height = image_size(path)
    return image_token_count(height, width, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# ------------------------------------------------------------------------- pools
def pool_documents(pool_dir: str, cfg: DataConfig) -> dict[str, Document]:
    """Every document of a pool (``pool/records.read_manifest``), pages with absolute paths."""
    from megatron_vlm.pool.records import read_manifest

    manifest = os.path.join(pool_dir, "manifest.jsonl")
    if not os.path.isfile(manifest):
        raise DataError(f"{manifest} does not exist: is {pool_dir} a pool built by tools/build_doc_pool.py?")
    docs = {}
    for record in read_manifest(pool_dir):
        pages = []
        for p in record.pages:
            tokens = p.tokens if (cfg.max_pixels, cfg.min_pixels) == (MAX_PIXELS, MIN_PIXELS) else \
                image_token_count(p.height, p.width, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            pages.append(DocPage(p.page, os.path.join(os.path.abspath(pool_dir), p.image), tokens))
        docs[record.doc_id] = Document(record.doc_id, pages, record.sha256)
    return docs


def pick_heldout_documents(pool_dir: str, count: Optional[int] = None, seed: int = 0,
                           exclude_doc_ids: Iterable[str] = (), exclude_hashes: Iterable[str] = ()) -> list:
    """Held-out documents of a pool (``DocRecord``s), a seeded random choice of ``count`` (all if
    None) among those not excluded. Write their hashes with :func:`write_hash_list` and pass that
    file to ``tools/build_doc_pool.py --exclude-hashes`` so training never sees them."""
    from megatron_vlm.pool.records import read_manifest

    skip_ids, skip_hashes = set(exclude_doc_ids), {h.lower() for h in exclude_hashes}
    records = [r for r in read_manifest(pool_dir) if r.doc_id not in skip_ids and r.sha256 not in skip_hashes]
    records.sort(key=lambda r: r.doc_id)
    random.Random(seed).shuffle(records)
    return records if count is None else records[:count]


def write_hash_list(path: str, docs: Iterable[Any]) -> int:
    """``sha256  doc_id`` per line (the first field is what ``--exclude-hashes`` reads)."""
    from megatron_vlm.common.storage import atomic_write_bytes

    lines = sorted({f"{d.sha256}  {d.doc_id}" for d in docs if getattr(d, "sha256", None)})
    atomic_write_bytes(path, ("# SHA-256 of evaluation documents: exclude them from training pools\n"
                              + "".join(line + "\n" for line in lines)).encode())
    return len(lines)


def _negatives_from_pool(docs: dict[str, Document], exclude_ids: set[str], cfg: DataConfig) -> list[Document]:
    return [d for doc_id, d in sorted(docs.items())
            if doc_id not in exclude_ids and (d.sha256 or "") not in cfg.exclude_hashes]


# ------------------------------------------------------------------------- our Samples
def _question_of(sample) -> str:
    if isinstance(sample.meta.get("question"), str) and sample.meta["question"].strip():
        return sample.meta["question"].strip()
    for message in reversed(sample.messages):
        if message["role"] != "user":
            continue
        content = message["content"]
        if isinstance(content, str):
            return content.strip()
        return "\n".join(item["text"] for item in content if item.get("type") == "text").strip()
    return ""


def read_samples_set(spec: DataSpec, cfg: DataConfig) -> EvalSet:
    """Held-out Samples (meta: answer, answer_format, evidence_pages, doc_id) -> an EvalSet."""
    from megatron_vlm.data.samples import SampleError, read_samples

    _check_options(spec, ("pool", "negatives", "name"))
    if not os.path.isfile(spec.path):
        raise DataError(f"samples file {spec.path} does not exist")
    name = spec.options.get("name") or os.path.splitext(os.path.basename(spec.path))[0]
    pool = pool_documents(spec.options["pool"], cfg) if spec.options.get("pool") else {}
    neg_pool = pool_documents(spec.options["negatives"], cfg) if spec.options.get("negatives") else pool
    out = EvalSet(name, [], info={"source": os.path.abspath(spec.path), "kind": "samples"})
    seen: set[str] = set()
    for number, result in read_samples(spec.path):
        where = f"{spec.path}:{number}"
        if isinstance(result, SampleError):
            out.dropped.append(Dropped(name, where, "bad_record", str(result)))
            continue
        try:
            example = _example_from_sample(result, name, pool, cfg, where)
        except DataError as err:
            out.dropped.append(Dropped(name, where, err.reason, str(err)))
            continue
        if example.id in seen:
            out.dropped.append(Dropped(name, where, "duplicate_id", f"id {example.id} appears twice"))
            continue
        seen.add(example.id)
        if example.doc is not None and example.doc.sha256 and example.doc.sha256 in cfg.exclude_hashes:
            out.dropped.append(Dropped(name, where, "in_training_pool",
                                       f"document {example.doc.doc_id} is in a training pool (by SHA-256)"))
            continue
        out.examples.append(example)
    # every pool document may pad a context (an instance never pads with its own gold document)
    out.negatives = _negatives_from_pool(neg_pool, set(), cfg)
    out.info["negatives"] = len(out.negatives)
    return out


def _example_from_sample(sample, name: str, pool: dict[str, Document], cfg: DataConfig, where: str) -> EvalExample:
    meta = sample.meta
    if "answer" not in meta:
        raise DataError(f"{where}: meta has no 'answer'", "missing_answer")
    try:
        fmt = normalize_format(meta.get("answer_format"))
    except ValueError as err:
        raise DataError(f"{where}: {err}", "bad_answer_format") from None
    question = _question_of(sample)
    if not question:
        raise DataError(f"{where}: no question (meta.question or a user text)", "missing_question")
    doc_id = str(meta.get("doc_id") or "")
    if doc_id and doc_id in pool:
        doc = pool[doc_id]
    elif sample.images:  # the sample carries its own pages
        numbers = meta.get("pages") if isinstance(meta.get("pages"), list) else list(range(1, len(sample.images) + 1))
        if len(numbers) != len(sample.images):
            raise DataError(f"{where}: meta.pages lists {len(numbers)} numbers for {len(sample.images)} images",
                            "bad_record")
        pages = []
        for n, path in zip(numbers, sample.image_paths()):
            if not os.path.isfile(path):
                raise DataError(f"{where}: image {path} does not exist", "missing_image")
            pages.append(DocPage(int(n), os.path.abspath(path), page_tokens(path, cfg)))
        doc = Document(doc_id or sample.id, pages, meta.get("sha256"))
    elif pool:
        raise DataError(f"{where}: doc_id {doc_id!r} is not in the pool given with pool=, and the sample has "
                        "no images of its own", "doc_not_in_pool")
    else:
        raise DataError(f"{where}: no images and no pool to find doc_id {doc_id!r} in (pass pool=POOL)",
                        "no_document")
    evidence = meta.get("evidence_pages") or []
    if not isinstance(evidence, list) or not all(isinstance(p, int) for p in evidence):
        raise DataError(f"{where}: evidence_pages must be a list of 1-based page numbers", "bad_record")
    known = {p.page for p in doc.pages}
    missing = [p for p in evidence if p not in known]
    if missing:
        raise DataError(f"{where}: evidence page(s) {missing} are not pages of document {doc.doc_id} "
                        f"({len(doc.pages)} pages)", "evidence_not_in_document")
    return EvalExample(id=sample.id, dataset=name, question=question, answer=meta["answer"], answer_format=fmt,
                       doc=doc, evidence_pages=sorted(set(evidence)),
                       meta={"sample_task": sample.task, **{k: meta[k] for k in ("evidence_sources",) if k in meta}})


# ------------------------------------------------------------------------- MMLongBench
_LENGTH_IN_NAME = re.compile(r"^(?P<name>.+?)_K(?P<k>\d+)$")
_PAGE_IN_NAME = (re.compile(r"page[_-]?(\d+)$", re.IGNORECASE), re.compile(r"-(\d+)-\d+$"), re.compile(r"(\d+)$"))
MMLB_FIELDS = ("question", "answer", "answer_format", "page_list")
MMLB_MAX_TEST_SAMPLES = 100  # MMLongBench configs/docqa_all.yaml: max_test_samples
MMLB_SEED = 42  # MMLongBench arguments.py: --seed default
# What to add to ``ans_page_list`` (0-based page indices of the original document) to get the page
# number in the published image names, per dataset (matched by key in the file name). Source:
# EdinburghNLP/MMLongBench README.md, "DocVQA page indices": SlideVQA keeps the original image names,
# numbered from 1 ("use ans_page_idx + 1", e.g. slideVQA_0 in slidevqa_K8.jsonl: [3] ->
# "...-4-1024.jpg"); MMLongBench-Doc and LongDocURL pages were extracted with names numbered from 0
# ("use ans_page_idx directly", e.g. longdocurl_1: 5 -> "4190345_page5.jpg").
OFFICIAL_EVIDENCE_OFFSET = (("slidevqa", 1), ("longdocurl", 0), ("mmlongdoc", 0))


def official_evidence_offset(dataset: str) -> Optional[int]:
    """MMLongBench's stated ``ans_page_list`` -> image-name offset for ``dataset`` (None: not one of its three)."""
    return next((offset for key, offset in OFFICIAL_EVIDENCE_OFFSET if key in dataset.lower()), None)


def official_selection(count: int, max_test_samples: Optional[int], seed: int = MMLB_SEED) -> list[int]:
    """0-based positions (in file order) of the records MMLongBench evaluates from one file of
    ``count`` records, in the order it evaluates them.

    Mirrors MMLongBench ``data.py: load_doc_qa``: the file is read with ``datasets.load_dataset
    ("json")`` (records in file order), then ``data.shuffle(seed=args.seed).select(range(min(len(
    data), max_test_samples)))``. ``datasets.Dataset.shuffle(seed=s)`` permutes the rows with
    ``numpy.random.default_rng(s).permutation(len(data))``; ``select(range(n))`` keeps the first n
    rows of that permutation. ``None`` means no choice (every record, in file order).
    """
    if max_test_samples is None:
        return list(range(count))
    import numpy as np

    permutation = np.random.default_rng(seed).permutation(count)
    return [int(i) for i in permutation[:min(count, max_test_samples)]]


def parse_max_test_samples(text: str) -> Optional[int]:
    """``--max-test-samples``: a positive N, or ``all`` for every record."""
    if str(text).strip().lower() in ("all", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--max-test-samples {text!r}: expected a positive number or 'all'") from None
    if value < 1:
        raise ValueError(f"--max-test-samples {text!r}: expected a positive number or 'all'")
    return value


def page_number_from_path(path: str) -> Optional[int]:
    """Page number in an MMLongBench image name (``..._page12.png``, SlideVQA ``...-3-1024.jpg``)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for pattern in _PAGE_IN_NAME:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return None


def _doc_of_path(path: str) -> str:
    return os.path.basename(os.path.dirname(path.replace("\\", "/")))


def _same_doc(folder: str, doc_name: str) -> bool:
    stem = os.path.splitext(doc_name)[0]
    return folder in (doc_name, stem) or (len(stem) >= 15 and folder[:15] == stem[:15])


def _mmlb_files(path: str) -> dict[str, dict[int, str]]:
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.jsonl")))
    if not files:
        raise DataError(f"no MMLongBench JSONL files at {path} (expected e.g. mmlongdoc_K128.jsonl)")
    grouped: dict[str, dict[int, str]] = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        match = _LENGTH_IN_NAME.match(stem)
        if not match:
            if os.path.isfile(path):
                raise DataError(f"{f}: the name must end in _K<length> (e.g. slidevqa_K64.jsonl) to know its length")
            continue
        grouped.setdefault(match.group("name"), {})[int(match.group("k")) * 1024] = f
    if not grouped:
        raise DataError(f"no *_K<length>.jsonl files in {path}")
    return grouped


def image_root_option(spec: DataSpec, kind: str, what: str) -> str:
    """The ``images=DIR`` option of a ``--data`` spec, which must name an existing folder."""
    image_root = spec.options.get("images")
    if not image_root:
        raise DataError(f"--data {kind}:{spec.path}: give the image folder with ,images=DIR ({what})")
    if not os.path.isdir(image_root):
        raise DataError(f"image folder {image_root} does not exist")
    return image_root


def read_mmlongbench(spec: DataSpec, cfg: DataConfig) -> list[EvalSet]:
    _check_options(spec, ("images", "name", "evidence_offset"))
    image_root = image_root_option(spec, "mmlb", "the mmlb_image folder that page_list paths are relative to")
    offset_opt = spec.options.get("evidence_offset", "official")
    if offset_opt not in ("official", "auto", "0", "1"):
        raise DataError(f"evidence_offset must be official, auto, 0 or 1, not {offset_opt!r}")
    sets = []
    grouped = _mmlb_files(spec.path)
    for name, by_length in sorted(grouped.items()):
        dataset_offset = offset_opt
        if offset_opt == "official":
            official = official_evidence_offset(name)
            if official is None:
                raise DataError(f"--data mmlb:{spec.path}: {name} is not one of MMLongBench's document-QA "
                                "datasets (longdocurl, mmlongdoc, slidevqa), whose evidence page offsets are "
                                "known; say how its ans_page_list maps to the image names with "
                                "evidence_offset=0 (names numbered like ans_page_list), 1 (names from 1) or auto")
            dataset_offset = str(official)
        if spec.options.get("name"):
            name = spec.options["name"] if len(grouped) == 1 else f"{spec.options['name']}-{name}"
        sets.append(_read_mmlb_dataset(name, by_length, image_root, dataset_offset, cfg))
        sets[-1].info["evidence_offset_source"] = offset_opt
    return sets


def _read_mmlb_dataset(name: str, by_length: dict[int, str], image_root: str, offset_opt: str,
                       cfg: DataConfig) -> EvalSet:
    out = EvalSet(name, [], info={"kind": "mmlb", "files": {str(k): v for k, v in sorted(by_length.items())}})
    records: dict[str, dict] = {}  # example key -> first record seen + where
    order: list[str] = []
    instances: dict[str, dict[int, list[str]]] = {}
    all_pages: dict[str, dict[int, str]] = {}  # document folder -> page number -> absolute path
    bad_keys: set[str] = set()
    picked: dict[str, set[int]] = {}  # example key -> lengths whose file chose it
    for length, path in sorted(by_length.items()):
        lines = list(iter_jsonl_lines(path))
        chosen = set(official_selection(len(lines), cfg.max_test_samples, cfg.selection_seed))
        if len(chosen) < len(lines):
            out.info.setdefault("selected", {})[str(length)] = f"{len(chosen)} of {len(lines)}"
        for position, (number, where, rec) in enumerate(lines):
            if position not in chosen:
                _note_pages(rec, image_root, all_pages)  # its pages still belong to their documents
                continue
            if isinstance(rec, json.JSONDecodeError):
                out.dropped.append(Dropped(name, where, "bad_record", f"not valid JSON ({rec.msg})"))
                continue
            missing = [k for k in MMLB_FIELDS if k not in rec] if isinstance(rec, dict) else list(MMLB_FIELDS)
            if missing or not isinstance(rec.get("page_list"), list):
                out.dropped.append(Dropped(name, where, "bad_record",
                                           f"missing or invalid field(s) {missing or ['page_list']}"))
                continue
            key = str(rec.get("id") or hashlib.sha256(
                f"{rec.get('doc_name')}|{rec['question']}".encode()).hexdigest()[:16])
            if key in instances and length in instances[key]:
                out.dropped.append(Dropped(name, where, "duplicate_id", f"id {key} appears twice in {path}"))
                continue
            paths = []
            for rel in rec["page_list"]:
                full = rel if os.path.isabs(rel) else os.path.join(image_root, rel)
                if not os.path.isfile(full):
                    out.dropped.append(Dropped(name, where, "missing_image", f"{full} does not exist"))
                    bad_keys.add(key)
                    break
                paths.append(os.path.abspath(full))
                folder, page = _doc_of_path(full), page_number_from_path(full)
                if page is not None:
                    all_pages.setdefault(folder, {}).setdefault(page, os.path.abspath(full))
            if key not in records:
                records[key] = dict(rec, _where=where)
                order.append(key)
            instances.setdefault(key, {})[length] = paths
            picked.setdefault(key, set()).add(length)
    missing = [d for d in out.dropped if d.reason == "missing_image"]
    if missing and len(missing) == len(bad_keys) == len(records):
        raise DataError(f"none of the page images of {name} were found under {image_root} (e.g. "
                        f"{missing[0].detail}); point ,images= at the folder that page_list paths are relative to")
    # the gold document of each example: its pages across every instance
    offsets = {0: 0, 1: 0}
    for key in order:
        rec = records[key]
        gold = _gold_folder(rec, instances[key])
        if gold is None:
            continue
        numbers = set(all_pages.get(gold, {}))
        for off in offsets:
            offsets[off] += sum(1 for p in rec.get("ans_page_list") or [] if isinstance(p, int) and p + off in numbers)
    offset = int(offset_opt) if offset_opt != "auto" else (1 if offsets[1] > offsets[0] else 0)
    out.info["evidence_offset"] = offset
    out.info["evidence_pages_found"] = {str(k): v for k, v in offsets.items()}  # per offset: a check
    if offsets[1 - offset] > offsets[offset]:
        out.info["evidence_offset_warning"] = (f"offset {1 - offset} would find {offsets[1 - offset]} evidence "
                                               f"page images, offset {offset} finds {offsets[offset]}")
    for key in order:
        rec = records[key]
        where = rec["_where"]
        if key in bad_keys:
            continue
        try:
            fmt = normalize_format(rec.get("answer_format"))
        except ValueError as err:
            out.dropped.append(Dropped(name, where, "bad_answer_format", str(err)))
            continue
        gold = _gold_folder(rec, instances[key])
        if gold is None:
            out.dropped.append(Dropped(name, where, "gold_document_not_found",
                                       f"no page of doc_name {rec.get('doc_name')!r} in page_list"))
            continue
        doc_pages = [DocPage(n, p, page_tokens(p, cfg)) for n, p in sorted(all_pages[gold].items())]
        doc = Document(gold, doc_pages)
        evidence = sorted({p + offset for p in rec.get("ans_page_list") or [] if isinstance(p, int)})
        known = {p.page for p in doc_pages}
        if any(p not in known for p in evidence):
            out.info.setdefault("evidence_not_found", 0)
            out.info["evidence_not_found"] += 1
            evidence = [p for p in evidence if p in known]
        published = {}
        for length, paths in instances[key].items():
            items = []
            for p in paths:
                folder, number = _doc_of_path(p), page_number_from_path(p)
                role = "gold" if folder == gold else "negative"
                items.append(ContextItem("page", folder, number if number is not None else 0, p,
                                         page_tokens(p, cfg), None, role))
            published[length] = items
        out.examples.append(EvalExample(
            id=key, dataset=name, question=str(rec["question"]), answer=rec["answer"], answer_format=fmt,
            doc=doc, evidence_pages=evidence, published=published,
            meta={k: rec[k] for k in ("doc_name", "ans_page_list", "doc_type", "evidence_sources") if k in rec},
            selection=None if cfg.max_test_samples is None else {"files": sorted(by_length),
                                                                 "picked": sorted(picked.get(key, ()))}))
    # negatives: every other document seen in the dataset, whole
    out.negatives = [Document(folder, [DocPage(n, p, page_tokens(p, cfg)) for n, p in sorted(pages.items())])
                     for folder, pages in sorted(all_pages.items())]
    out.info["negatives"] = len(out.negatives)
    return out


def _note_pages(rec: Any, image_root: str, all_pages: dict[str, dict[int, str]]) -> None:
    """Adds the existing page images of a record that is not evaluated to their documents."""
    if not isinstance(rec, dict) or not isinstance(rec.get("page_list"), list):
        return
    for rel in rec["page_list"]:
        full = rel if os.path.isabs(str(rel)) else os.path.join(image_root, str(rel))
        page = page_number_from_path(full)
        if page is not None and os.path.isfile(full):
            all_pages.setdefault(_doc_of_path(full), {}).setdefault(page, os.path.abspath(full))


def _gold_folder(rec: dict, instances: dict[int, list[str]]) -> Optional[str]:
    doc_name = str(rec.get("doc_name") or "")
    folders = [_doc_of_path(p) for paths in instances.values() for p in paths]
    if doc_name:
        for folder in folders:
            if _same_doc(folder, doc_name):
                return folder
        return None
    distinct = set(folders)  # no doc_name: a single-document instance names it
    return distinct.pop() if len(distinct) == 1 else None


# ------------------------------------------------------------------------- needle in a haystack
_TEXT_NEEDLES = (
    ("The combination of the blue archive safe is {n}.", "What is the combination of the blue archive safe?"),
    ("Visitors to the north greenhouse must show pass number {n}.",
     "Which pass number must visitors to the north greenhouse show?"),
    ("The lighthouse keeper counted {n} ships last winter.",
     "How many ships did the lighthouse keeper count last winter?"),
    ("Room {n} is reserved for the annual chess tournament.",
     "Which room is reserved for the annual chess tournament?"),
)


def build_niah_sets(spec: DataSpec, cfg: DataConfig) -> list[EvalSet]:
    """Text and image needles at each depth over pool pages (haystacks are built per length)."""
    _check_options(spec, ("kinds", "depths", "repeats", "name"))
    docs = pool_documents(spec.path, cfg)
    haystack = _negatives_from_pool(docs, set(), cfg)
    if not haystack:
        raise DataError(f"pool {spec.path} has no documents to build haystacks from")
    kinds = spec.options.get("kinds", "text/image").split("/")
    if any(k not in ("text", "image") for k in kinds):
        raise DataError(f"niah kinds must be text and/or image (text/image), not {spec.options.get('kinds')!r}")
    try:
        depths = [float(d) for d in spec.options.get("depths", "0/0.25/0.5/0.75/1").split("/")]
        repeats = int(spec.options.get("repeats", "1"))
    except ValueError:
        raise DataError("niah depths are /-separated fractions (0/0.5/1) and repeats an integer") from None
    if any(not 0 <= d <= 1 for d in depths) or repeats < 1:
        raise DataError("niah depths must lie in [0, 1] and repeats be >= 1")
    prefix = spec.options.get("name", "niah")
    work = cfg.work_dir or os.path.join(os.path.abspath(spec.path), "niah")
    sets = []
    for kind in kinds:
        name = f"{prefix}-{kind}"
        examples = []
        for depth in depths:
            for r in range(repeats):
                ex_id = f"{name}-d{depth:.2f}-r{r}"
                rng = random.Random(int(hashlib.sha256(f"{cfg.seed}|{ex_id}".encode()).hexdigest()[:16], 16))
                number = rng.randrange(1000, 99999)
                if kind == "text":
                    fact, question = rng.choice(_TEXT_NEEDLES)
                    needle = Needle("text", depth, text=fact.format(n=number))
                else:
                    path = os.path.join(work, f"{ex_id}.png")
                    _write_number_card(path, number)
                    needle = Needle("image", depth, image=path, tokens=page_tokens(path, cfg))
                    question = ("One of the images above is not a document page but a small card showing a "
                                "number. What number is on the card?")
                examples.append(EvalExample(ex_id, name, question, str(number), "Integer", task="niah",
                                            needle=needle, meta={"depth": depth, "needle": kind}))
        sets.append(EvalSet(name, examples, negatives=haystack,
                            info={"kind": "niah", "pool": os.path.abspath(spec.path)}))
    return sets


def _write_number_card(path: str, number: int) -> None:
    """A 448x224 white card with a black frame and the number in large digits (deterministic)."""
    from PIL import Image, ImageDraw, ImageFont

    from megatron_vlm.common.storage import atomic_write_bytes

    if os.path.isfile(path):
        return
    image = Image.new("RGB", (448, 224), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, 443, 219], outline="black", width=6)
    try:
        font = ImageFont.load_default(size=96)
    except TypeError:  # Pillow < 10.1: a small bitmap font only
        font = ImageFont.load_default()
    text = str(number)
    box = draw.textbbox((0, 0), text, font=font)
    draw.text(((448 - (box[2] - box[0])) / 2 - box[0], (224 - (box[3] - box[1])) / 2 - box[1]), text,
              fill="black", font=font)
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


__all__ = [
    "ContextItem",
    "DataConfig",
    "DataError",
    "DataSpec",
    "DocPage",
    "Document",
    "Dropped",
    "EvalExample",
    "EvalSet",
    "Needle",
    "load_data",
    "official_evidence_offset",
    "page_number_from_path",
    "parse_data_spec",
    "pick_heldout_documents",
    "pool_documents",
    "read_mmlongbench",
    "read_samples_set",
    "write_hash_list",
]
