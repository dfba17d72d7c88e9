"""Teachers: what turns a document segment into one QA pair.

A teacher receives a :class:`TeacherRequest` (a document of the pool and the pages of one sampled
segment) and returns a :class:`TeacherResult`: a :class:`QAPair`, or the reason it has none. Two
implementations share the :class:`Teacher` protocol:

- :class:`OpenAITeacher` (here): any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, a
  hosted API), the segment's pages sent as images. Concurrency is bounded by a semaphore; every
  call has a timeout; 408/409/429/5xx, timeouts and connection errors are retried with jittered
  exponential backoff (``Retry-After`` honoured); a reply whose JSON cannot be used gets one
  re-ask (configurable); replies are cached on disk under the SHA-256 of the request (page images
  hashed by content), so a rerun or a resumed run pays nothing twice; token usage and cost are
  counted. The API key is read from an environment variable, sent only in the request header, and
  never logged, cached or written (error texts are redacted before they are logged).
- ``offline_teacher.OfflineTeacher``: pairs computed from the pool's text layer and tables, correct
  by construction, so the pipeline runs without a model server.

Authentication, permission and not-found errors (wrong key, model or URL), and a long run of failed
requests, stop the run (:class:`TeacherFatalError`): every later request would fail the same way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from megatron_vlm.synthesis.prompts import (
    PROMPT_VERSION,
    ReplyFormatError,
    build_messages,
    choose_exemplars,
    parse_reply,
    reask_message,
)
from megatron_vlm.pool.records import DocRecord
from megatron_vlm.common.storage import atomic_write_json
from megatron_vlm.common.inputs import sha256_file

log = logging.getLogger(__name__)

CACHE_SCHEMA = "megatron-vlm/teacher-cache/v1"


@dataclass
class TeacherRequest:
    """One segment to write a QA pair for (pages 1-based, inclusive)."""

    job: int  # the synthesis job this request belongs to (deterministic from the seed)
    task: str
    pool_dir: str
    record: DocRecord
    first_page: int
    last_page: int
    section_titles: list[str]
    seed: int  # per-job seed: exemplar choice, offline fact choice

    @property
    def doc_id(self) -> str:
        return self.record.doc_id

    def page_paths(self) -> list[str]:
        """Absolute paths of the segment's page images, in page order."""
        return [os.path.join(self.pool_dir, self.record.pages[p - 1].image)
                for p in range(self.first_page, self.last_page + 1)]


@dataclass
class QAPair:
    """A teacher's question with its answer and evidence (pages 1-based, in the whole document)."""

    question: str
    answer: Any  # str | int | float | list
    answer_format: str  # String | Integer | Float | List
    evidence_pages: list[int]
    evidence_sources: list[str]
    evidence_description: str = ""
    derivation: Optional[dict] = None  # offline teacher: how the answer was computed (for audits and tests)


@dataclass
class TeacherResult:
    pair: Optional[QAPair] = None
    drop_reason: Optional[str] = None  # set when pair is None
    detail: str = ""
    cached: bool = False


@dataclass
class Usage:
    """What the teacher spent. ``requests`` counts HTTP calls (retries included), cache hits none."""

    requests: int = 0
    replies: int = 0
    cache_hits: int = 0
    retries: int = 0
    reasks: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replies_without_usage: int = 0
    cost_usd: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["cost_usd"] = round(self.cost_usd, 6)
        out["errors"] = dict(sorted(self.errors.items()))
        return out


@runtime_checkable
class Teacher(Protocol):
    """What the synthesis stage needs from a teacher."""

    kind: str  # "openai" | "offline"
    model: str
    usage: Usage

    async def generate(self, request: TeacherRequest) -> TeacherResult: ...

    async def aclose(self) -> None: ...


class TeacherFatalError(RuntimeError):
    """A failure that every later request would repeat (bad key, model, URL): stop the run."""


# ------------------------------------------------------------------------------ OpenAI client


@dataclass
class OpenAIConfig:
    base_url: str  # e.g. http://localhost:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # name of the variable holding the key (never the key itself)
    concurrency: int = 8
    timeout_s: float = 300.0  # per HTTP call
    max_retries: int = 5  # per call, after the first try
    backoff_s: float = 2.0  # first backoff; doubles per retry, jittered
    backoff_max_s: float = 120.0
    max_reasks: int = 1  # follow-up turns after a reply without usable JSON
    temperature: float = 0.7
    max_completion_tokens: int = 2048
    exemplars: int = 2
    cache_dir: Optional[str] = None  # None: no cache
    price_input_per_mtok: float = 0.0  # USD per million prompt tokens
    price_output_per_mtok: float = 0.0
    image_max_pixels: Optional[int] = None  # downscale pages sent to the teacher (None: as stored)
    max_consecutive_failures: int = 25  # requests in a row that end without a reply: stop the run
    extra_body: dict = field(default_factory=dict)  # passed through (e.g. vLLM sampling options)

    def validate(self) -> "OpenAIConfig":
        if not self.base_url or not self.model:
            raise ValueError("the openai teacher needs --base-url and --model")
        if self.concurrency < 1 or self.timeout_s <= 0 or self.max_retries < 0 or self.max_reasks < 0:
            raise ValueError("concurrency >= 1, timeout > 0, retries >= 0 and re-asks >= 0 are required")
        return self


_RETRY_STATUS = {408, 409, 425, 429}
_FATAL_STATUS = {401, 403, 404}


@dataclass
class _Reply:
    content: str
    cached: bool


def _data_url(path: str, max_pixels: Optional[int]) -> str:
    """A page image as a data URL, downscaled to ``max_pixels`` when asked."""
    with open(path, "rb") as f:
        data = f.read()
    mime = {".png": "image/png", ".webp": "image/webp"}.get(os.path.splitext(path)[1].lower(), "image/jpeg")
    if max_pixels:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                scale = (max_pixels / (image.width * image.height)) ** 0.5
                size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
                small = image.convert("RGB").resize(size, Image.BICUBIC)
                out = io.BytesIO()
                small.save(out, format="JPEG", quality=85)
                data, mime = out.getvalue(), "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class OpenAITeacher:
    """QA pairs from an OpenAI-compatible chat endpoint (see the module docstring)."""

    kind = "openai"

    def __init__(self, config: OpenAIConfig, client: Any = None):
        self.config = config.validate()
        self.model = config.model
        self.usage = Usage()
        self._api_key = os.environ.get(config.api_key_env, "")
        if not self._api_key:
            log.warning("no API key in $%s; sending a placeholder (fine for local vLLM/SGLang servers)",
                        config.api_key_env)
        self._client = client or self._make_client()
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._consecutive_failures = 0

    def _make_client(self) -> Any:
        try:
            from openai import AsyncOpenAI
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise TeacherFatalError("the openai teacher needs the openai package (pip install openai)") from exc
        return AsyncOpenAI(base_url=self.config.base_url, api_key=self._api_key or "EMPTY", max_retries=0,
                           timeout=self.config.timeout_s)

    async def aclose(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            await close()

    def redact(self, text: str) -> str:
        """``text`` with the API key (if it somehow appears, e.g. echoed by a server) blanked."""
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "[redacted]")
        return text

    # ------------------------------------------------------------------ one request, retried

    def cache_key(self, messages: list[dict]) -> str:
        body = {"model": self.config.model, "messages": messages, "temperature": self.config.temperature,
                "max_tokens": self.config.max_completion_tokens, "extra_body": self.config.extra_body,
                "image_max_pixels": self.config.image_max_pixels}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Optional[str]:
        if not self.config.cache_dir:
            return None
        return os.path.join(self.config.cache_dir, key[:2], key + ".json")

    def _cache_get(self, key: str) -> Optional[str]:
        path = self._cache_path(key)
        if not path or not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            if entry.get("schema") == CACHE_SCHEMA and isinstance(entry.get("content"), str):
                return entry["content"]
        except (OSError, ValueError):
            pass  # a damaged entry is treated as missing and rewritten
        return None

    def _cache_put(self, key: str, content: str, usage: dict) -> None:
        path = self._cache_path(key)
        if path:
            atomic_write_json(path, {"schema": CACHE_SCHEMA, "model": self.config.model, "content": content,
                                     "usage": usage}, indent=None, fsync=False)

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        delay = min(self.config.backoff_max_s, self.config.backoff_s * (2 ** attempt))
        delay *= 0.5 + random.random() / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.backoff_max_s))
        return delay

    def _account(self, response: Any) -> dict:
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
        completion = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
        if usage is None:
            self.usage.replies_without_usage += 1
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cost_usd += (prompt * self.config.price_input_per_mtok
                                + completion * self.config.price_output_per_mtok) / 1e6
        return {"prompt_tokens": prompt, "completion_tokens": completion}

    async def _complete(self, keyed: list[dict], wire: list[dict], where: str) -> _Reply:
        """One chat completion for ``wire`` messages (cached under ``keyed``), with retries.

        Raises ``_Failed`` (with a drop reason) when the request cannot succeed.
        """
        import openai

        key = self.cache_key(keyed)
        cached = self._cache_get(key)
        if cached is not None:
            self.usage.cache_hits += 1
            return _Reply(cached, True)
        attempt = 0
        while True:
            async with self._semaphore:
                self.usage.requests += 1
                try:
                    response = await self._client.chat.completions.create(
                        model=self.config.model, messages=wire, temperature=self.config.temperature,
                        max_tokens=self.config.max_completion_tokens, extra_body=self.config.extra_body or None)
                    error: Optional[BaseException] = None
                except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError) as exc:
                    error = exc
            if error is None:
                self._consecutive_failures = 0
                self.usage.replies += 1
                usage = self._account(response)
                choices = getattr(response, "choices", None) or []
                content = (choices[0].message.content if choices and choices[0].message else None) or ""
                content = self.redact(content)  # a server echoing the key must not get it cached or written
                self._cache_put(key, content, usage)
                return _Reply(content, False)
            status = getattr(error, "status_code", None)
            label = f"http_{status}" if status else ("timeout" if isinstance(error, openai.APITimeoutError)
                                                      else "connection_error")
            self.usage.errors[label] += 1
            if status in _FATAL_STATUS:
                raise TeacherFatalError(f"{where}: the endpoint answered HTTP {status} "
                                        f"({self.redact(_short(error))}); check --base-url, --model and "
                                        f"${self.config.api_key_env}")
            retryable = status is None or status in _RETRY_STATUS or status >= 500
            if not retryable or attempt >= self.config.max_retries:
                self.usage.failed_requests += 1
                self._consecutive_failures += 1
                if self._consecutive_failures >= self.config.max_consecutive_failures:
                    raise TeacherFatalError(f"{self._consecutive_failures} requests in a row failed; last: "
                                            f"{label} ({self.redact(_short(error))})")
                reason = "teacher_unavailable" if retryable else "teacher_rejected_request"
                raise _Failed(reason, f"{label} after {attempt + 1} tries: {self.redact(_short(error))}")
            retry_after = _retry_after(error)
            delay = self._backoff(attempt, retry_after)
            attempt += 1
            self.usage.retries += 1
            log.warning("%s: %s, retry %d/%d in %.1fs", where, label, attempt, self.config.max_retries, delay)
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------------- a QA pair

    async def generate(self, request: TeacherRequest) -> TeacherResult:
        paths = request.page_paths()
        digests = await asyncio.to_thread(lambda: [sha256_file(p) for p in paths])
        rng = random.Random(request.seed)
        exemplars = choose_exemplars(request.task, self.config.exemplars, rng)
        keyed = build_messages(request.task, request.first_page, request.last_page, request.section_titles,
                               [f"sha256:{d}" for d in digests], exemplars)
        urls: Optional[list[str]] = None
        where = f"doc {request.doc_id} job {request.job}"
        cached_all = True
        for ask in range(self.config.max_reasks + 1):
            if urls is None and self._cache_get(self.cache_key(keyed)) is None:
                urls = await asyncio.to_thread(lambda: [_data_url(p, self.config.image_max_pixels) for p in paths])
            wire = _with_urls(keyed, urls) if urls is not None else keyed
            try:
                reply = await self._complete(keyed, wire, where)
            except _Failed as failed:
                return TeacherResult(drop_reason=failed.reason, detail=failed.detail)
            cached_all = cached_all and reply.cached
            try:
                parsed = parse_reply(reply.content)
            except ReplyFormatError as exc:
                if ask == self.config.max_reasks:
                    return TeacherResult(drop_reason="invalid_json", detail=f"{exc} (after {ask} re-ask(s))",
                                         cached=cached_all)
                self.usage.reasks += 1
                log.info("%s: reply unusable (%s); re-asking", where, exc)
                follow = [{"role": "assistant", "content": reply.content}, reask_message(str(exc))]
                keyed = keyed + follow
                continue
            pair = QAPair(question=parsed.question, answer=parsed.answer, answer_format=parsed.answer_format,
                          evidence_pages=parsed.evidence_pages, evidence_sources=parsed.evidence_sources,
                          evidence_description=parsed.evidence_description)
            return TeacherResult(pair=pair, cached=cached_all)
        raise AssertionError("unreachable")  # pragma: no cover


class _Failed(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _with_urls(keyed: list[dict], urls: Sequence[str]) -> list[dict]:
    """``keyed`` messages with the page placeholders of the first user turn replaced by data URLs."""
    out, queue = [], list(urls)
    for message in keyed:
        content = message["content"]
        if isinstance(content, list) and queue:
            new = []
            for item in content:
                if item.get("type") == "image_url" and queue:
                    item = {"type": "image_url", "image_url": {"url": queue.pop(0)}}
                new.append(item)
            message = {**message, "content": new}
        out.append(message)
    return out


def _retry_after(error: BaseException) -> Optional[float]:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def teacher_meta(teacher: Teacher) -> dict:
    return {"kind": teacher.kind, "model": teacher.model, "prompt_version": PROMPT_VERSION}


__all__ = [
    "CACHE_SCHEMA",
    "OpenAIConfig",
    "OpenAITeacher",
    "QAPair",
    "Teacher",
    "TeacherFatalError",
    "TeacherRequest",
    "TeacherResult",
    "Usage",
    "teacher_meta",
]
