"""Long-document VQA synthesis (extract-single, extract-multi, reasoning) and the OCR baselines
(ocr-full, ocr-needle) from a document pool, written as training samples.

Flow of one job (paper §4.2): pick a document whose page count lies in the window
(``--min-pages``/``--max-pages``, the recipe's 32-50), sample one or more consecutive sections
spanning 8-15 pages (``sections.sample_segment``: page windows where a document has no usable
structure), give the teacher only that segment, check its QA pair (:func:`check_pair`), and place
it back into the whole document: the sample's images are *all* pages, the question is anchored to
the segment ("on Page 12", "in the Methods section") so it stays unambiguous there.

Jobs are numbered; job ``j`` takes the ``j % n``-th document of a seeded shuffle of the ``n``
eligible documents (a new shuffle every ``n`` jobs, so documents are used evenly) and a segment
drawn with a per-job seed, so a job means the same thing in every run. Output files (for
``OUT.jsonl``):

- ``OUT.jsonl``: one :class:`megatron_vlm.data.samples.Sample` per line (schema below);
- ``OUT.dropped.jsonl``: one line per dropped job (job, doc_id, reason, detail, question);
- ``OUT.report.json``: counts, drop reasons, token statistics, question kinds (samples per kind),
  teacher usage and cost per run, and every dropped job;
- ``OUT.settings.json``: the settings that shape the output; a rerun must use the same ones.

Both JSONL files are appended line by line (fsynced); a rerun skips every job either already
holds and goes on until ``--num-samples`` samples exist (resume: nothing duplicated, nothing
lost; a torn last line from a kill is cut off).

Sample schema (``task`` = the task name; every VQA/OCR record)::

    id            "<doc_id>:<task>:<job>"
    image_root    the pool folder (absolute); images are relative to it
    images        every page image of the document, in page order
    image_tokens  Qwen2.5-VL tokens per page (the pool's count)
    messages      user: one {"type": "image"} per page, then {"type": "text"}: a line saying that page
                  numbers count the page images from 1 in order, then the question;
                  assistant: the answer (List answers as a JSON array)
    meta          doc_id, source (PDF), language, num_pages,
                  num_tokens (exact length of the chat-templated sequence with every image expanded:
                  image tokens + 2 per image + text and template tokens), num_text_tokens,
                  answer, answer_format (String|Integer|Float|List), question (as the teacher wrote it),
                  evidence_pages (1-based), evidence_page_indices (0-based), evidence_sources,
                  evidence_description, segment {first_page, last_page, sections} (1-based),
                  segment_indices [first, last] (0-based), teacher {kind, model}, prompt_version,
                  job, derivation (offline teacher);
                  OCR tasks: answer_format "String", ocr_pages (1-based), teacher {kind: "pool-blocks"},
                  prompt_version; no answer copy (the assistant turn is the target).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from megatron_vlm.cli import step as cli_step
from megatron_vlm.data.samples import Sample
from megatron_vlm.synthesis.ocr_tasks import OCR_PROMPT_VERSION, ocr_full, ocr_needle
from megatron_vlm.synthesis.prompts import ANSWER_FORMATS, EVIDENCE_SOURCES, PROMPT_VERSION, VQA_TASKS
from megatron_vlm.pool.records import DocRecord, load_blocks, read_manifest
from megatron_vlm.pool.sections import FRONT_MATTER, Section, Segment, sample_segment
from megatron_vlm.common.storage import JsonlAppender, atomic_write_json, read_jsonl
from megatron_vlm.synthesis.teachers import (
    QAPair,
    Teacher,
    TeacherFatalError,
    TeacherRequest,
    Usage,
)

log = logging.getLogger(__name__)

SCHEMA = "megatron-vlm/vqa-synthesis/v1"
OCR_TASKS = ("ocr-full", "ocr-needle")
ALL_TASKS = VQA_TASKS + OCR_TASKS
MAX_ANSWER_CHARS = 500
# drops that say nothing about the job, only that the teacher could not be reached (connection refused,
# timeouts, 408/409/425/429/5xx after every retry): a rerun retries these jobs instead of skipping them
TRANSIENT_REASONS = frozenset({"teacher_unavailable"})
MAX_QUESTION_CHARS = 1000


@dataclass
class SynthesisConfig:
    pool: str
    task: str
    output: str
    num_samples: int
    seed: int = 0
    min_pages: int = 32  # document length window (the recipe: 32-50 pages)
    max_pages: int = 50
    segment_min_pages: int = 8
    segment_max_pages: int = 15
    max_seq_tokens: Optional[int] = 131072  # drop samples longer than this (None: keep all)
    max_jobs: Optional[int] = None  # give up after this many jobs (default: 5 x num_samples + 20)
    concurrency: int = 8  # jobs in flight (the teacher bounds its own HTTP concurrency too)
    max_needles: int = 3
    tokenizer: Optional[str] = None  # tokenizer directory (default: the built Qwen2.5-VL one)
    progress: bool = True

    SETTINGS = ("task", "seed", "min_pages", "max_pages", "segment_min_pages", "segment_max_pages",
                "max_seq_tokens", "max_needles")

    def validate(self) -> "SynthesisConfig":
        if self.task not in ALL_TASKS:
            raise ValueError(f"--task must be one of {ALL_TASKS}, got {self.task!r}")
        if self.num_samples < 0:
            raise ValueError("--num-samples must be >= 0")
        if not 1 <= self.min_pages <= self.max_pages:
            raise ValueError(f"need 1 <= --min-pages <= --max-pages, got {self.min_pages}, {self.max_pages}")
        if not 1 <= self.segment_min_pages <= self.segment_max_pages:
            raise ValueError("need 1 <= segment min pages <= segment max pages")
        if not os.path.isfile(os.path.join(self.pool, "manifest.jsonl")):
            raise ValueError(f"{self.pool} has no manifest.jsonl: build it with tools/build_doc_pool.py first")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        return self


def sidecar(output: str, name: str) -> str:
    """``OUT.jsonl`` -> ``OUT.<name>``."""
    base = output[:-len(".jsonl")] if output.endswith(".jsonl") else output
    return f"{base}.{name}"


# ----------------------------------------------------------------------------- validation

_PAGE_REF = re.compile(r"\b(?:pages?|pp?\.|seiten?)\s*(\d+(?:\s*(?:,|&|\band\b|\bto\b|\bthrough\b|-|\u2013|\u2014|"
                       r"\bbis\b|\bund\b)\s*(?:\band\b\s*)?\d+)*)", re.IGNORECASE)
_CJK_PAGE = re.compile(r"第\s*(\d+)\s*页")
_GLOBAL = re.compile(r"\b(?:across|throughout|in) the (?:whole|entire|full) (?:document|file|report|text)\b|"
                     r"\bacross the (?:document|file)\b|\b(?:whole|entire) (?:document|file)\b", re.IGNORECASE)
_SECTION_WORD = re.compile(r"\b(?:sections?|subsections?|chapters?|parts?|appendix|appendices|headings?)\b",
                           re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:(?:chapter|section|part|appendix)\s+)?(?:[0-9]+|[ivxlc]+|[a-z])(?:\.[0-9]+)*[.):]?\s+",
                        re.IGNORECASE)
_INT = re.compile(r"^[-+\u2212]?\d{1,3}(?:,\d{3})+$|^[-+\u2212]?\d+$")
_FLOAT = re.compile(r"^[-+\u2212]?[$€£¥]?\s*[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?\s*(?:%|percent)?$")


def page_references(question: str, num_pages: Optional[int] = None) -> list[int]:
    """Page numbers a question names ("Page 12", "Pages 20, 21, and 25", "pp. 4-9").

    With ``num_pages``, a number after the first of a run that cannot be a page ("on Page 12, 2023
    figures") is not taken for one; the first number after "Page" always is.
    """
    numbers = []
    for m in _PAGE_REF.finditer(question):
        run = [int(n) for n in re.findall(r"\d+", m.group(1))]
        numbers += run[:1] + [n for n in run[1:] if num_pages is None or n <= num_pages]
    numbers += [int(n) for n in _CJK_PAGE.findall(question)]
    return numbers


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"\w+", text.casefold())) + " "


def section_anchor(question: str, sections: Sequence[Section], first: int, last: int) -> Optional[str]:
    """The title of a section overlapping pages first..last that the question names as a section
    (title quoted, or near a word like "section"/"chapter"), else None."""
    qwords = _words(question)
    has_section_word = bool(_SECTION_WORD.search(question))
    for section in sections:
        if section.last_page < first or section.first_page > last or not section.title or section.title == FRONT_MATTER:
            continue
        for title in {section.title, _NUMBERING.sub("", section.title)}:
            words = _words(title)
            if len(words.strip()) < 4 or words not in qwords:
                continue
            quoted = any(q + title.casefold() in question.casefold() for q in ("\"", "\u201c", "'", "\u2018"))
            if has_section_word or quoted:
                return section.title
    return None


def answer_matches_format(answer: Any, fmt: str) -> bool:
    """Whether ``answer`` is of the declared answer type."""
    if fmt == "List":
        return isinstance(answer, list) and len(answer) >= 1 and all(
            isinstance(a, (str, int, float)) and not isinstance(a, bool) and str(a).strip() for a in answer)
    if isinstance(answer, (list, bool)) or answer is None:
        return False
    if fmt == "Integer":
        if isinstance(answer, float):
            return answer.is_integer()
        return isinstance(answer, int) or bool(_INT.match(str(answer).strip()))
    if fmt == "Float":
        if isinstance(answer, (int, float)):
            return True
        text = str(answer).strip()
        return bool(re.search(r"\d", text)) and bool(_FLOAT.match(text))
    if fmt == "String":
        return isinstance(answer, str) and bool(answer.strip())
    return False


@dataclass
class Drop:
    reason: str
    detail: str = ""


def check_pair(pair: QAPair, task: str, first: int, last: int, num_pages: int,
               sections: Sequence[Section]) -> Optional[Drop]:
    """Why a QA pair cannot become a sample (None: it can). Pages are 1-based."""
    question = pair.question.strip() if isinstance(pair.question, str) else ""
    if not question:
        return Drop("empty_question")
    if len(question) > MAX_QUESTION_CHARS:
        return Drop("question_too_long", f"{len(question)} characters")
    if pair.answer is None or (isinstance(pair.answer, (str, list)) and not pair.answer):
        return Drop("empty_answer")
    if len(render_answer(pair.answer)) > MAX_ANSWER_CHARS:
        return Drop("answer_too_long", f"{len(render_answer(pair.answer))} characters")
    if pair.answer_format not in ANSWER_FORMATS:
        return Drop("bad_answer_format", f"{pair.answer_format!r} is not one of {list(ANSWER_FORMATS)}")
    if not answer_matches_format(pair.answer, pair.answer_format):
        return Drop("answer_type_mismatch", f"{pair.answer!r} is not a {pair.answer_format}")
    pages = pair.evidence_pages
    if not pages:
        return Drop("no_evidence_pages")
    missing = [p for p in pages if not 1 <= p <= num_pages]
    if missing:
        return Drop("evidence_page_missing", f"pages {missing} do not exist (document has {num_pages})")
    outside = [p for p in pages if not first <= p <= last]
    if outside:
        return Drop("evidence_outside_segment", f"pages {outside} lie outside the segment {first}-{last}")
    if task == "extract-single" and len(set(pages)) != 1:
        return Drop("not_single_page", f"extract-single with evidence pages {sorted(set(pages))}")
    sources = [s for s in pair.evidence_sources]
    unknown = [s for s in sources if s not in EVIDENCE_SOURCES]
    if unknown:
        return Drop("bad_evidence_source", f"{unknown} not in {list(EVIDENCE_SOURCES)}")
    if _GLOBAL.search(question):
        return Drop("global_scope", "the question refers to the whole document")
    refs = page_references(question, num_pages)
    outside_refs = sorted({p for p in refs if not first <= p <= last})
    if outside_refs:
        return Drop("anchor_outside_segment", f"the question names page(s) {outside_refs}; segment is {first}-{last}")
    if not refs and section_anchor(question, sections, first, last) is None:
        return Drop("no_segment_anchor", "the question names neither a page nor a section of the segment")
    return None


def normalize_question(question: str) -> str:
    return " ".join(re.findall(r"\w+", question.casefold()))


def render_answer(answer: Any) -> str:
    """The assistant turn for an answer: List answers as a JSON array, others as text."""
    if isinstance(answer, list):
        return json.dumps([a if isinstance(a, str) else str(a) for a in answer], ensure_ascii=False)
    return str(answer).strip()


def _normalize_sources(sources: Sequence[str]) -> list[str]:
    canonical = {s.lower(): s for s in EVIDENCE_SOURCES}
    return [canonical.get(str(s).strip().lower(), str(s).strip()) for s in sources]


# ------------------------------------------------------------------------------- samples


def page_note(num_pages: int) -> str:
    return (f"The images are the {num_pages} pages of one document, in order; page numbers below count them from 1 "
            f"(Page 1 is the first image).")


_TOKENIZERS: dict[Optional[str], Any] = {}


class TokenCounter:
    """Exact sequence length of a sample under the Qwen2.5-VL chat template (images expanded)."""

    def __init__(self, tokenizer_dir: Optional[str] = None):
        from megatron_vlm.data.tokenizer import load_tokenizer

        if tokenizer_dir not in _TOKENIZERS:  # loading takes seconds; one copy per process
            _TOKENIZERS[tokenizer_dir] = load_tokenizer(tokenizer_dir)
        self.tokenizer = _TOKENIZERS[tokenizer_dir]

    def count(self, messages: list[dict], image_tokens: Sequence[int]) -> tuple[int, int]:
        """(num_tokens, num_text_tokens): text tokens exclude the vision markers and pads."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        n_images = len(image_tokens)
        total = len(ids) - n_images + sum(image_tokens)
        return total, len(ids) - 3 * n_images


def make_sample(record: DocRecord, pool_dir: str, task: str, job: int, question: str, answer_text: str,
                meta: dict, counter: TokenCounter) -> Sample:
    images = [p.image for p in record.pages]
    tokens = [p.tokens for p in record.pages]
    content: list[dict] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": f"{page_note(record.num_pages)}\n{question}"})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer_text}]
    num_tokens, text_tokens = counter.count(messages, tokens)
    full_meta = {"doc_id": record.doc_id, "source": record.source, "language": record.language,
                 "num_pages": record.num_pages, "num_tokens": num_tokens, "num_text_tokens": text_tokens}
    full_meta.update(meta)
    full_meta["job"] = job
    return Sample(id=f"{record.doc_id}:{task}:{job}", task=task, images=images, messages=messages,
                  image_root=os.path.abspath(pool_dir), image_tokens=tokens, meta=full_meta)


# ---------------------------------------------------------------------------------- jobs


def job_seed(seed: int, task: str, job: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:{job}".encode()).digest()[:8], "big")


def document_for_job(docs: Sequence[DocRecord], seed: int, job: int) -> DocRecord:
    """The document of a job: a fresh seeded shuffle of the documents every len(docs) jobs."""
    n = len(docs)
    epoch, index = divmod(job, n)
    order = list(range(n))
    random.Random(f"{seed}:docs:{epoch}").shuffle(order)
    return docs[order[index]]


@dataclass
class Outcome:
    job: int
    doc_id: str
    sample: Optional[Sample] = None
    drop: Optional[Drop] = None
    dedup_key: Optional[str] = None
    question: str = ""
    segment: Optional[list[int]] = None


@dataclass
class RunStats:
    accepted: int = 0
    dropped: Counter = field(default_factory=Counter)
    jobs: int = 0


class Synthesizer:
    """Runs the jobs of one output file (see the module docstring)."""

    def __init__(self, config: SynthesisConfig, teacher: Optional[Teacher], counter: Optional[TokenCounter] = None,
                 on_accept: Optional[Callable[[Sample], None]] = None):
        self.cfg = config.validate()
        if config.task in VQA_TASKS and teacher is None:
            raise ValueError(f"{config.task} needs a teacher")
        self.teacher = teacher
        self.counter = counter or TokenCounter(config.tokenizer)
        self.on_accept = on_accept
        self.paths = {"output": config.output, "dropped": sidecar(config.output, "dropped.jsonl"),
                      "report": sidecar(config.output, "report.json"),
                      "settings": sidecar(config.output, "settings.json")}
        all_docs = list(read_manifest(config.pool))
        self.filtered = Counter()
        self.too_long = Counter()
        self.docs = []
        self._floors: dict[int, int] = {}
        for record in all_docs:
            if record.num_pages < config.min_pages:
                self.filtered["too_few_pages"] += 1
            elif record.num_pages > config.max_pages:
                self.filtered["too_many_pages"] += 1
            elif config.max_seq_tokens is not None and self.floor_tokens(record) > config.max_seq_tokens:
                self.too_long["too_long"] += 1  # cannot fit whatever the question: no job is spent on it
            else:
                self.docs.append(record)
        self.docs.sort(key=lambda r: r.doc_id)
        self.pool_size = len(all_docs)

    def floor_tokens(self, record: DocRecord) -> int:
        """The shortest sample a document can give: every page, the chat template and the page note,
        with an empty question and answer. A document above ``--max-seq-len`` by this count alone is
        not eligible (decided once, up front, for every task)."""
        overhead = self._floors.get(record.num_pages)
        if overhead is None:
            content: list[dict] = [{"type": "image"} for _ in range(record.num_pages)]
            content.append({"type": "text", "text": f"{page_note(record.num_pages)}\n"})
            messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
            total, _ = self.counter.count(messages, [0] * record.num_pages)
            overhead = self._floors[record.num_pages] = total
        return overhead + sum(p.tokens for p in record.pages)

    # ------------------------------------------------------------------ settings and resume

    def settings(self) -> dict:
        values = {name: getattr(self.cfg, name) for name in SynthesisConfig.SETTINGS}
        values["pool"] = os.path.realpath(self.cfg.pool)
        if self.cfg.task in VQA_TASKS and self.teacher is not None:
            values["teacher"] = {"kind": self.teacher.kind, "model": self.teacher.model}
            values["prompt_version"] = PROMPT_VERSION
        else:
            values["prompt_version"] = OCR_PROMPT_VERSION
        return {"schema": SCHEMA, **values}

    def _check_settings(self) -> None:
        path = self.paths["settings"]
        wanted = json.loads(json.dumps(self.settings()))
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                existing = json.load(f)
            if existing != wanted:
                from megatron_vlm.cli import settings_diff

                raise ValueError(f"{self.cfg.output} was written with other settings ({settings_diff(existing, wanted)}; "
                                 f"see {path}); use a new --output, the same settings, or --force to start it again")
        else:
            atomic_write_json(path, wanted)

    def _resume_state(self) -> tuple[set[int], set[str], int, list[dict]]:
        """Jobs already done, dedup keys and sample count of the output, and the drops that stand.

        A job dropped for a transient reason (:data:`TRANSIENT_REASONS`: the teacher was down) is
        not done: it runs again, and its old drop no longer counts once it has a newer outcome."""
        done: set[int] = set()
        keys: set[str] = set()
        samples = read_jsonl(self.paths["output"], repair=True)
        for rec in samples:
            meta = rec.get("meta") or {}
            if isinstance(meta.get("job"), int):
                done.add(meta["job"])
            keys.add(self._dedup_key(meta.get("doc_id", ""), meta))
        drops = read_jsonl(self.paths["dropped"], repair=True)
        latest: dict = {}
        for d in drops:  # the log is appended: a retried job's later line is its outcome
            latest[d.get("job") if isinstance(d.get("job"), int) else id(d)] = d
        standing = [d for d in latest.values() if not (isinstance(d.get("job"), int) and d["job"] in done)]
        done |= {d["job"] for d in standing if isinstance(d.get("job"), int) and not _is_transient(d)}
        return done, keys, len(samples), standing

    def _dedup_key(self, doc_id: str, meta: dict) -> str:
        if self.cfg.task in OCR_TASKS:
            return f"{doc_id}|{meta.get('ocr_pages')}"
        return f"{doc_id}|{normalize_question(str(meta.get('question', '')))}"

    # ---------------------------------------------------------------------------- one job

    async def run_job(self, job: int) -> Outcome:
        record = document_for_job(self.docs, self.cfg.seed, job)
        rng = random.Random(job_seed(self.cfg.seed, self.cfg.task, job))
        floor = record.total_tokens + 2 * record.num_pages  # the pages alone, before any text
        if self.cfg.max_seq_tokens is not None and floor > self.cfg.max_seq_tokens:
            return Outcome(job, record.doc_id, drop=Drop("too_long", f"the pages alone take {floor} tokens > "
                                                                     f"{self.cfg.max_seq_tokens}; no teacher call"))
        try:
            if self.cfg.task in OCR_TASKS:
                return self._ocr_job(job, record, rng)
            return await self._vqa_job(job, record, rng)
        except FileNotFoundError as exc:
            return Outcome(job, record.doc_id, drop=Drop("pool_file_missing",
                                                          f"{exc.filename or exc}: rebuild this document's pool entry"))
        except (OSError, ValueError) as exc:
            return Outcome(job, record.doc_id, drop=Drop("pool_read_error", f"{type(exc).__name__}: {exc}"))

    def _finish(self, job: int, record: DocRecord, question: str, answer_text: str, meta: dict,
                segment: Optional[list[int]]) -> Outcome:
        sample = make_sample(record, self.cfg.pool, self.cfg.task, job, question, answer_text, meta, self.counter)
        outcome = Outcome(job, record.doc_id, question=question, segment=segment)
        limit = self.cfg.max_seq_tokens
        if limit is not None and sample.meta["num_tokens"] > limit:
            outcome.drop = Drop("too_long", f"{sample.meta['num_tokens']} tokens > {limit}")
            return outcome
        outcome.sample = sample
        outcome.dedup_key = self._dedup_key(record.doc_id, sample.meta)
        return outcome

    def _ocr_job(self, job: int, record: DocRecord, rng: random.Random) -> Outcome:
        blocks = load_blocks(self.cfg.pool, record)
        if self.cfg.task == "ocr-full":
            inst = ocr_full(record, blocks, self.cfg.pool)
        else:
            inst = ocr_needle(record, blocks, rng, self.cfg.max_needles)
        if inst.drop_reason:
            return Outcome(job, record.doc_id, drop=Drop(inst.drop_reason, inst.detail))
        meta = {"answer_format": "String", "ocr_pages": inst.pages,
                "teacher": {"kind": "pool-blocks", "model": "text-layer"}, "prompt_version": OCR_PROMPT_VERSION}
        return self._finish(job, record, inst.question, inst.answer, meta, [inst.pages[0], inst.pages[-1]])

    async def _vqa_job(self, job: int, record: DocRecord, rng: random.Random) -> Outcome:
        assert self.teacher is not None
        segment: Optional[Segment] = sample_segment(record.sections, record.num_pages, rng,
                                                    self.cfg.segment_min_pages, self.cfg.segment_max_pages)
        if segment is None:
            return Outcome(job, record.doc_id, drop=Drop("no_segment", "the document has no pages"))
        first, last = segment.first_page, segment.last_page
        request = TeacherRequest(job=job, task=self.cfg.task, pool_dir=self.cfg.pool, record=record,
                                 first_page=first, last_page=last, section_titles=list(segment.titles),
                                 seed=rng.getrandbits(63))
        result = await self.teacher.generate(request)
        if result.pair is None:
            return Outcome(job, record.doc_id, drop=Drop(result.drop_reason or "teacher_failed", result.detail),
                           segment=[first, last])
        pair = result.pair
        pair.evidence_sources = _normalize_sources(pair.evidence_sources)
        drop = check_pair(pair, self.cfg.task, first, last, record.num_pages, record.sections)
        if drop is not None:
            return Outcome(job, record.doc_id, drop=drop, question=str(pair.question), segment=[first, last])
        evidence = sorted(set(pair.evidence_pages))
        meta: dict[str, Any] = {
            "answer": pair.answer, "answer_format": pair.answer_format, "question": pair.question.strip(),
            "evidence_pages": evidence, "evidence_page_indices": [p - 1 for p in evidence],
            "evidence_sources": pair.evidence_sources, "evidence_description": pair.evidence_description,
            "segment": {"first_page": first, "last_page": last, "sections": list(segment.titles)},
            "segment_indices": [first - 1, last - 1],
            "teacher": {"kind": self.teacher.kind, "model": self.teacher.model}, "prompt_version": PROMPT_VERSION,
        }
        if pair.derivation is not None:
            meta["derivation"] = pair.derivation
        return self._finish(job, record, pair.question.strip(), render_answer(pair.answer), meta, [first, last])

    # ------------------------------------------------------------------------------ run

    def default_max_jobs(self) -> int:
        if self.cfg.max_jobs is not None:
            return self.cfg.max_jobs
        if self.cfg.task == "ocr-full":
            return len(self.docs)  # one transcription per document
        return 5 * self.cfg.num_samples + 20

    async def run(self) -> dict:
        os.makedirs(os.path.dirname(os.path.abspath(self.cfg.output)), exist_ok=True)
        self._check_settings()
        done, keys, existing, old_drops = self._resume_state()
        retried = {d["job"] for d in old_drops if _is_transient(d)}  # their old lines give way to new outcomes
        stats = RunStats()
        started = time.monotonic()
        status = "complete"
        max_jobs = self.default_max_jobs() if self.docs else 0
        if existing or done:
            log.info("%s: %d samples and %d finished jobs already there, resuming", self.cfg.output, existing,
                     len(done))
        bar = _progress(self.cfg.num_samples, existing, self.cfg.task, self.cfg.progress)
        accepted_total = existing
        new_drops: list[dict] = []
        inflight: dict[asyncio.Task, int] = {}
        next_job = 0
        error: Optional[BaseException] = None
        try:
            with JsonlAppender(self.paths["output"]) as out, JsonlAppender(self.paths["dropped"]) as dropped:
                while True:
                    while (accepted_total + len(inflight) < self.cfg.num_samples
                           and len(inflight) < self.cfg.concurrency and next_job < max_jobs):
                        if next_job not in done:
                            inflight[asyncio.ensure_future(self.run_job(next_job))] = next_job
                        next_job += 1
                    if not inflight:
                        break
                    finished, _ = await asyncio.wait(list(inflight), return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(finished, key=lambda t: inflight[t]):
                        inflight.pop(task)
                        outcome = task.result()  # a TeacherFatalError propagates from here
                        stats.jobs += 1
                        cli_step()  # tests only: MVLM_TEST_SLOW_STEP
                        if outcome.sample is not None and outcome.dedup_key in keys:
                            outcome.drop = Drop("duplicate", "same document and normalized question (OCR: same pages)")
                            outcome.sample = None
                        if outcome.sample is not None:
                            retried.discard(outcome.job)
                            keys.add(outcome.dedup_key or "")
                            out.append(json.loads(outcome.sample.to_json()))
                            accepted_total += 1
                            stats.accepted += 1
                            if self.on_accept:
                                self.on_accept(outcome.sample)
                            if bar is not None:
                                bar.update(1)
                        else:
                            assert outcome.drop is not None
                            entry = {"job": outcome.job, "doc_id": outcome.doc_id, "reason": outcome.drop.reason,
                                     "detail": outcome.drop.detail[:1000]}
                            if outcome.drop.reason in TRANSIENT_REASONS:
                                entry["transient"] = True  # a rerun retries this job
                            if outcome.question:
                                entry["question"] = outcome.question[:1000]
                            if outcome.segment:
                                entry["segment"] = outcome.segment
                            dropped.append(entry)
                            new_drops.append(entry)
                            retried.discard(outcome.job)
                            stats.dropped[outcome.drop.reason] += 1
                        if bar is not None:
                            bar.set_postfix(dropped=sum(stats.dropped.values()), refresh=False)
            if accepted_total < self.cfg.num_samples:
                status = "exhausted" if self.docs else "no_documents"
        except TeacherFatalError as exc:
            status, error = f"aborted: {exc}", exc
        except BaseException as exc:  # interrupted: the files are consistent; say so in the report
            status, error = f"interrupted: {type(exc).__name__}", exc
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)
            if bar is not None:
                bar.close()
            jobs_redone = {d["job"] for d in old_drops if _is_transient(d)} - retried
            standing = [d for d in old_drops if not (_is_transient(d) and d["job"] in jobs_redone)]
            report = self._report(status, stats, accepted_total, standing + new_drops, time.monotonic() - started,
                                  max_jobs)
        if error is not None:
            raise error
        return report

    def _report(self, status: str, stats: RunStats, accepted_total: int, drops: list[dict], seconds: float,
                max_jobs: int) -> dict:
        path = self.paths["report"]
        runs = []
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    runs = json.load(f).get("runs", [])
            except (OSError, ValueError):
                runs = []
        usage = self.teacher.usage.to_dict() if self.teacher is not None else Usage().to_dict()
        runs.append({"status": status, "accepted": stats.accepted, "jobs": stats.jobs,
                     "dropped": dict(sorted(stats.dropped.items())), "seconds": round(seconds, 3),
                     "teacher_usage": usage})
        accepted = read_jsonl(self.paths["output"])
        tokens = [rec["meta"]["num_tokens"] for rec in accepted]
        by_reason = Counter(d["reason"] for d in drops)
        total_usage: Counter = Counter()
        for run in runs:
            for k, v in run.get("teacher_usage", {}).items():
                if isinstance(v, (int, float)):
                    total_usage[k] += v
        report = {
            "schema": SCHEMA,
            "status": status,
            "settings": self.settings(),
            "files": {k: os.path.abspath(v) for k, v in self.paths.items()},
            "counts": {"requested": self.cfg.num_samples, "accepted": accepted_total,
                       "dropped": len(drops), "dropped_by_reason": dict(sorted(by_reason.items())),
                       "transient_failures": sum(1 for d in drops if _is_transient(d)),
                       "max_jobs": max_jobs},
            "documents": {"in_pool": self.pool_size, "eligible": len(self.docs),
                          "filtered_by_page_window": dict(sorted(self.filtered.items())),
                          "page_window": [self.cfg.min_pages, self.cfg.max_pages],
                          "filtered_by_length": dict(sorted(self.too_long.items())),
                          "max_seq_len": self.cfg.max_seq_tokens},
            "tokens": {"min": min(tokens), "max": max(tokens), "mean": round(sum(tokens) / len(tokens), 1),
                       "total": sum(tokens)} if tokens else {},
            "question_kinds": question_kinds(accepted),
            "teacher_usage_total": {k: round(v, 6) if isinstance(v, float) else v for k, v in total_usage.items()},
            "runs": runs,
            "dropped": drops,
        }
        atomic_write_json(path, report)
        return report


def question_kinds(samples: Sequence[dict]) -> dict[str, int]:
    """Samples per question kind, most frequent first: the offline teacher's ``derivation.kind``
    ("table_cell", "column_total", "locate_section", ...), "ocr" for the OCR tasks, "teacher" for a
    model teacher's pairs (it names no kind)."""
    kinds: Counter = Counter()
    for rec in samples:
        meta = rec.get("meta") or {}
        derivation = meta.get("derivation")
        if isinstance(derivation, dict) and isinstance(derivation.get("kind"), str):
            kinds[derivation["kind"]] += 1
        else:
            kinds["ocr" if "ocr_pages" in meta else "teacher"] += 1
    return dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


def _is_transient(drop: dict) -> bool:
    return isinstance(drop.get("job"), int) and (bool(drop.get("transient")) or drop.get("reason") in TRANSIENT_REASONS)


def shortfall(report: dict) -> Optional[str]:
    """Why a run made fewer samples than asked (None when it made them all): one line for the CLI."""
    counts, docs = report["counts"], report["documents"]
    if counts["accepted"] >= counts["requested"]:
        return None
    head = f"{counts['accepted']} of {counts['requested']} samples"
    where = f"see {report['files']['report']}"
    if report["status"] == "no_documents" or not docs["eligible"]:
        length = docs.get("filtered_by_length") or {}
        too_long = (f", {sum(length.values())} cannot fit --max-seq-len {docs.get('max_seq_len')}"
                    if length else "")
        return (f"{head}: no document of the pool is eligible ({docs['in_pool']} in the pool; page window "
                f"{docs['page_window']} filtered {docs['filtered_by_page_window'] or 'none'}{too_long}); {where}")
    transient = counts.get("transient_failures", 0)
    if transient:
        return (f"{head}: {transient} job(s) failed because the teacher was unavailable; rerun the same command "
                f"to retry them ({where})")
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(counts["dropped_by_reason"].items(), key=lambda kv: -kv[1]))
    return (f"{head}: the pool is exhausted after {counts['max_jobs']} jobs on {docs['eligible']} eligible "
            f"document(s) (dropped: {reasons or 'none'}); use more documents, a wider page window or --max-jobs; "
            f"{where}")


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=desc, unit="sample", dynamic_ncols=True,
                file=sys.stderr)


def synthesize(config: SynthesisConfig, teacher: Optional[Teacher] = None,
               counter: Optional[TokenCounter] = None) -> dict:
    """Run a synthesis to completion (blocking); returns the report."""

    async def main() -> dict:
        synth = Synthesizer(config, teacher, counter)
        try:
            return await synth.run()
        finally:
            if teacher is not None:
                await teacher.aclose()

    return asyncio.run(main())


__all__ = [
    "ALL_TASKS",
    "OCR_TASKS",
    "SCHEMA",
    "Drop",
    "SynthesisConfig",
    "Synthesizer",
    "TokenCounter",
    "answer_matches_format",
    "check_pair",
    "document_for_job",
    "make_sample",
    "normalize_question",
    "page_note",
    "page_references",
    "question_kinds",
    "render_answer",
    "section_anchor",
    "shortfall",
    "sidecar",
    "synthesize",
]
