"""Scoring predictions: an LLM judge through any OpenAI-compatible endpoint, or the rules.

The judge follows the rubric of the paper's Appendix B.1 (prompts written here in our own words):

* single answers (String, Integer, Float, and "Not answerable"): the judge says correct or not
  (score 1 or 0);
* lists: the judge counts the items in the model's answer and how many reference items they
  cover; the score is the F1 of those counts (``scoring.f1_from_counts``).

Replies are parsed from the last JSON object in the text. A reply without a usable one is asked
again (bounded); if it still fails, that record is scored by the rules and marked
``scored_by: "rules (judge reply unusable)"``. Every judge reply is appended to a JSONL cache
(:class:`JudgeCache`) keyed by (rubric version, judge model, question, answer, format, prediction),
so a killed run resumes and re-scoring old predictions costs nothing twice; identical keys judged
in parallel send one request (the others wait for its answer). The API key comes from the
environment and is never written anywhere.

``mmlb:URL[,model=NAME],prompts=DIR`` is MMLongBench v1.1's own LLM judge, with the benchmark's
prompts read from the user's checkout at run time (``megatron_vlm/eval/mmlb_judge.py``).

Rule scorers (no endpoint): ``rules`` (ours, ``scoring.score_answer``) and ``mmlb-rules``
(MMLongBench's official docqa rule metric, ``mmlb_rules.score_mmlb``). Without ``--judge``
(``auto``), records of MMLongBench datasets get ``mmlb-rules`` and all others ``rules``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

from megatron_vlm.eval.backends import BackendError, OpenAIClient
from megatron_vlm.eval.scoring import (clean_prediction, f1_from_counts, gold_is_not_answerable, normalize_format,
                                       parse_list, score_answer)

RUBRIC_VERSION = "mvlm-judge-v1"

SINGLE_RUBRIC = """You grade a model's answer to a question about a document by comparing it with the reference answer.

Rules:
- Judge only the final answer the model gives, not how it got there.
- The answer is correct when it states the same thing as the reference. These count as the same: a number written another way (0.1 and 10%, 1,200 and 1.2 thousand), synonyms and common abbreviations (UK and United Kingdom), singular and plural forms. Answers that are merely related, less precise, or that add a wrong claim are not correct.
- If the reference is "Not answerable", the answer is correct only when it says that the document does not give the answer.
- If the question asks for several things, all of them must be right.

Give at most 100 words of reasoning, then end with a JSON object on its own line: {"correct": 1} if the answer is correct, {"correct": 0} if not."""

LIST_RUBRIC = """You grade a model's answer to a question whose reference answer is a list of required items.

Steps:
1. Pull out the separate items the model's answer gives, ignoring filler such as "The answer is".
2. For every reference item decide whether the model's items cover it. An item is covered when the model names it exactly or by an unambiguous equivalent: the same number in another form (0.1 and 10%), a synonym or abbreviation (UK and United Kingdom), singular or plural. Loosely related items do not count.

Give at most 150 words of reasoning, then end with a JSON object on its own line:
{"answer_items": <number of items in the model's answer>, "covered_items": <number of reference items covered>}"""

SINGLE_EXAMPLES = (
    ("What share of the respondents chose option B?", "0.35", "35% of respondents.",
     'The reference 0.35 and the answer 35% are the same share.\n{"correct": 1}'),
    ("Which city hosts the company's headquarters?", "Not answerable", "Berlin",
     'The reference says the document does not give this, but the answer names a city.\n{"correct": 0}'),
    ("In which year did the plant open, and how many people worked there?", "1998; 450", "It opened in 1998.",
     'The year is right but the number of workers is missing.\n{"correct": 0}'),
)
LIST_EXAMPLES = (
    ("Which colours appear in the logo?", "['red', 'blue', 'green']", "Red and blue.",
     'The answer gives red and blue (2 items); both are reference items, green is missing.\n'
     '{"answer_items": 2, "covered_items": 2}'),
    ("Which countries are named as partners?", "['United Kingdom', 'France']", "UK, France and Spain",
     'The answer gives UK, France, Spain (3 items); UK and France cover the two reference items.\n'
     '{"answer_items": 3, "covered_items": 2}'),
)
_ASK_AGAIN = "Your reply did not end with the JSON object asked for. Reply again and end with that JSON object."


@dataclass
class ScoreResult:
    score: float
    scored_by: str
    detail: dict[str, Any] = field(default_factory=dict)


class Scorer(Protocol):
    name: str
    parallel: int

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult: ...


class RuleScorer:
    name = "rules"
    parallel = 1

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult:
        if not clean_prediction(prediction):
            return ScoreResult(0.0, "empty")
        return ScoreResult(score_answer(prediction, answer, answer_format), "rules")


class MMLBRuleScorer:
    """MMLongBench's own rule-based docqa score (parsing after "Answer:" included). Like the official
    run (eval.py, eval_api.py: the "Answer:" of the prompt is prepended to every output before
    parsing), the prediction is read after an "Answer:" put in front of it, so a later "answer:"
    inside the model's text does not cut it."""

    name = "mmlb-rules"
    parallel = 1

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult:
        from megatron_vlm.eval.mmlb_rules import ANSWER_PREFIX, parse_answer, score_mmlb

        output = ANSWER_PREFIX + (prediction or "")
        value, note = score_mmlb(output, answer, normalize_format(answer_format))
        if not parse_answer(output):
            return ScoreResult(value, "empty")
        if note:
            return ScoreResult(value, "mmlb-rules (gold read as a string)", {"note": note})
        return ScoreResult(value, "mmlb-rules")


# dataset names the official loader (MMLongBench data.py: load_data) sends to its docqa scorer
MMLB_DATASET_KEYS = ("longdocurl", "mmlongdoc", "slidevqa")


def is_mmlb_dataset(name: Any, mmlb_datasets: Iterable[str] = ()) -> bool:
    name = str(name or "")
    return name in set(mmlb_datasets) or any(key in name for key in MMLB_DATASET_KEYS)


class AutoRuleScorer:
    """The default: ``mmlb-rules`` for MMLongBench records (by dataset name), ``rules`` otherwise."""

    name = "auto"
    parallel = 1

    def __init__(self, mmlb_datasets: Iterable[str] = ()):
        self.mmlb_datasets = frozenset(mmlb_datasets)
        self.mmlb, self.ours = MMLBRuleScorer(), RuleScorer()

    def score_record(self, record: dict) -> ScoreResult:
        docqa = record.get("task", "docqa") == "docqa"
        scorer = self.mmlb if docqa and is_mmlb_dataset(record.get("dataset"), self.mmlb_datasets) else self.ours
        return scorer.score(str(record.get("question", "")), record.get("answer"), record.get("answer_format"),
                            record.get("prediction") or "")

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult:
        return self.ours.score(question, answer, answer_format, prediction)


class JudgeError(RuntimeError):
    """The judge endpoint cannot be reached; the cache keeps what was judged, rerun to resume."""


class _Pending:
    __slots__ = ("event", "entry", "error")

    def __init__(self):
        self.event = threading.Event()
        self.entry: Optional[dict] = None
        self.error: Optional[BaseException] = None


class JudgeCache:
    """Judged answers by key: read from a JSONL file at start (resume), appended as they come, and
    computed once per key. A caller asking for a key that another thread is judging waits for that
    answer instead of sending the same request; if that request fails, every waiter gets its error."""

    def __init__(self, path: Optional[str] = None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._pending: dict[str, _Pending] = {}
        self._appender = None
        if path:
            from megatron_vlm.common.storage import JsonlAppender, read_jsonl

            for entry in read_jsonl(path, repair=True):
                if isinstance(entry, dict) and "key" in entry:
                    self._entries[entry["key"]] = entry
            self._appender = JsonlAppender(path, fsync=False)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._entries.get(key)

    def once(self, key: str, compute: Callable[[], dict]) -> tuple[dict, str]:
        """(entry, how): ``how`` is "cache" (on disk or judged before), "shared" (waited for the
        same key judged by another thread) or "new" (``compute()`` ran here, its entry stored)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry, "cache"
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        if not owner:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            return pending.entry, "shared"
        try:
            entry = dict(compute(), key=key)
        except BaseException as err:
            pending.error = err
            with self._lock:
                del self._pending[key]
            pending.event.set()
            raise
        with self._lock:
            self._entries[key] = entry
            if self._appender is not None:
                self._appender.append(entry)
            del self._pending[key]
        pending.entry = entry
        pending.event.set()
        return entry, "new"

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None


def _json_objects(text: str) -> list[dict]:
    """JSON objects in ``text`` (fenced or bare), last one last."""
    found = []
    for match in re.finditer(r"\{[^{}]*\}", text or ""):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def _as_count(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and float(value).is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_single_reply(text: str) -> Optional[int]:
    """1 or 0 from the last {"correct": ...} object, None if there is no usable one."""
    for obj in reversed(_json_objects(text)):
        if "correct" in obj:
            value = obj["correct"]
            if isinstance(value, bool):
                return int(value)
            count = _as_count(value)
            return count if count in (0, 1) else None
    return None


def parse_list_reply(text: str) -> Optional[tuple[int, int]]:
    """(answer_items, covered_items) from the last object that has both, None if unusable."""
    for obj in reversed(_json_objects(text)):
        if "answer_items" in obj and "covered_items" in obj:
            a, c = _as_count(obj["answer_items"]), _as_count(obj["covered_items"])
            return None if a is None or c is None else (a, c)
    return None


class LLMJudge:
    """LLM-as-judge over ``/v1/chat/completions``, cached in a JSONL file (resumable)."""

    def __init__(self, url: str, model: Optional[str] = None, cache_path: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 300.0, retries: int = 3,
                 bad_reply_retries: int = 2, parallel: int = 4, max_tokens: int = 512):
        self.client = OpenAIClient(url, api_key_env, timeout, retries, model)
        self.name = f"judge:{self.client.model}"
        self.parallel = max(1, parallel)
        self.bad_reply_retries = bad_reply_retries
        self.max_tokens = max_tokens
        self.cache_path = cache_path
        self._lock = threading.Lock()
        self.cache = JudgeCache(cache_path)
        self.calls = 0  # requests sent (cache hits and shared keys cost none)

    def _key(self, kind: str, question: str, answer: Any, answer_format: str, prediction: str) -> str:
        payload = json.dumps([RUBRIC_VERSION, self.client.model, kind, question, answer, answer_format, prediction],
                             ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _messages(self, kind: str, question: str, answer: Any, prediction: str) -> list[dict]:
        rubric, examples = (LIST_RUBRIC, LIST_EXAMPLES) if kind == "list" else (SINGLE_RUBRIC, SINGLE_EXAMPLES)
        gold_name = "Reference list" if kind == "list" else "Reference answer"
        messages = [{"role": "system", "content": rubric}]
        for q, a, p, reply in examples:
            messages.append({"role": "user", "content": f"Question: {q}\n{gold_name}: {a}\nModel answer: {p}"})
            messages.append({"role": "assistant", "content": reply})
        answer_text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        messages.append({"role": "user", "content": f"Question: {question}\n{gold_name}: {answer_text}\n"
                                                    f"Model answer: {prediction}"})
        return messages

    def _ask(self, kind: str, messages: list[dict]) -> tuple[str, Any, int]:
        replies = 0
        text = ""
        for _ in range(self.bad_reply_retries + 1):
            try:
                text = self.client.chat(messages, max_tokens=self.max_tokens, temperature=0.0)
            except BackendError as err:
                raise JudgeError(f"judge {self.client.url}: {err}") from None
            replies += 1
            with self._lock:
                self.calls += 1
            parsed = parse_list_reply(text) if kind == "list" else parse_single_reply(text)
            if parsed is not None:
                return text, parsed, replies
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": _ASK_AGAIN}]
        return text, None, replies

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult:
        cleaned = clean_prediction(prediction)
        if not cleaned:
            return ScoreResult(0.0, "empty")
        fmt = normalize_format(answer_format)
        gold_items = parse_list(answer) if fmt == "List" and not gold_is_not_answerable(answer, fmt) else []
        kind = "list" if gold_items else "single"
        key = self._key(kind, question, answer, fmt, cleaned)

        def ask() -> dict:
            raw, parsed, replies = self._ask(kind, self._messages(kind, question, answer, cleaned))
            return {"judge": self.client.model, "rubric": RUBRIC_VERSION, "kind": kind,
                    "parsed": list(parsed) if isinstance(parsed, tuple) else parsed, "replies": replies, "raw": raw}

        entry, how = self.cache.once(key, ask)
        cached = how != "new"
        parsed = entry["parsed"]
        detail: dict[str, Any] = {"kind": kind, "cached": cached}
        if parsed is None:
            detail["judge_reply"] = (entry.get("raw") or "")[-300:]
            return ScoreResult(score_answer(cleaned, answer, fmt), "rules (judge reply unusable)", detail)
        if kind == "single":
            return ScoreResult(float(parsed), self.name, detail)
        answer_items, covered = parsed
        detail.update(answer_items=answer_items, covered_items=covered, reference_items=len(gold_items))
        if covered > min(answer_items, len(gold_items)):
            detail["clamped"] = True
        return ScoreResult(f1_from_counts(len(gold_items), answer_items, covered), self.name, detail)

    def close(self) -> None:
        self.cache.close()


JUDGE_OPTIONS = {"openai": ("model",), "mmlb": ("model", "prompts")}
JUDGE_FORMS = "auto, rules, mmlb-rules, openai:URL[,model=NAME] or mmlb:URL[,model=NAME],prompts=DIR"


def parse_judge_spec(spec: Optional[str]) -> tuple[str, str, dict[str, str]]:
    """``auto`` (or None), ``rules``, ``mmlb-rules``, ``openai:URL[,model=NAME]`` or
    ``mmlb:URL[,model=NAME],prompts=DIR`` -> (kind, url, options)."""
    if spec in (None, "", "auto"):
        return "auto", "", {}
    if spec in ("rules", "mmlb-rules"):
        return spec, "", {}
    kind, sep, rest = spec.partition(":")
    kind = "openai" if kind == "vllm" else kind
    if kind not in JUDGE_OPTIONS or not sep or not rest:
        raise ValueError(f"--judge {spec!r}: expected {JUDGE_FORMS}")
    pieces = rest.split(",")
    options = {}
    allowed = JUDGE_OPTIONS[kind]
    for piece in pieces[1:]:
        key, eq, value = piece.partition("=")
        if not eq or key not in allowed or not value:
            raise ValueError(f"--judge {spec!r}: option {piece!r} is not one of "
                             + ", ".join(f"{k}=..." for k in allowed))
        options[key] = value
    if not pieces[0]:
        raise ValueError(f"--judge {spec!r}: no URL")
    if kind == "mmlb" and "prompts" not in options:
        raise ValueError(f"--judge {spec!r}: give prompts=DIR, your MMLongBench checkout (its utils_prompt.py "
                         "and data.py hold the judge prompts)")
    return kind, pieces[0], options


def make_scorer(spec: Optional[str], cache_path: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                parallel: int = 4, timeout: float = 300.0, retries: int = 3, mmlb_datasets: Iterable[str] = ()):
    kind, url, options = parse_judge_spec(spec)
    if kind == "auto":
        return AutoRuleScorer(mmlb_datasets)
    if kind == "rules":
        return RuleScorer()
    if kind == "mmlb-rules":
        return MMLBRuleScorer()
    if kind == "mmlb":
        from megatron_vlm.eval.mmlb_judge import MMLBJudge

        return MMLBJudge(url, options["prompts"], options.get("model"), cache_path, api_key_env, timeout,
                         parallel=parallel)
    return LLMJudge(url, options.get("model"), cache_path, api_key_env, timeout, retries, parallel=parallel)


def score_records(records: Iterable[dict], scorer, progress: bool = True, desc: str = "scoring") -> list[dict]:
    """Copies of ``records`` (question, answer, answer_format, prediction) with ``score`` (0-1),
    ``scored_by`` and ``judge`` (details) added; order kept."""
    from tqdm import tqdm

    records = list(records)

    def one(record: dict) -> dict:
        if record.get("task") == "mmniah":  # MMLongBench scores MM-NIAH by its rules, never a judge
            from megatron_vlm.eval.mmniah_metrics import score_record
            result = score_record(record)
        elif hasattr(scorer, "score_record"):  # scorers that look at more than the answer (the dataset)
            result = scorer.score_record(record)
        else:
            result = scorer.score(str(record.get("question", "")), record.get("answer"), record.get("answer_format"),
                                  record.get("prediction") or "")
        out = dict(record, score=result.score, scored_by=result.scored_by)
        if result.detail:
            out["judge"] = result.detail
        return out

    bar = tqdm(total=len(records), desc=desc, disable=not progress, unit="answer")
    results: list[dict] = []
    if getattr(scorer, "parallel", 1) > 1 and len(records) > 1:
        from megatron_vlm.cli import thread_map  # Ctrl-C does not wait for the judge calls in flight

        for out in thread_map(one, records, scorer.parallel):
            results.append(out)
            bar.update()
    else:
        for record in records:
            results.append(one(record))
            bar.update()
    bar.close()
    return results


__all__ = [
    "AutoRuleScorer",
    "LIST_RUBRIC",
    "MMLBRuleScorer",
    "MMLB_DATASET_KEYS",
    "is_mmlb_dataset",
    "LLMJudge",
    "JudgeCache",
    "JudgeError",
    "RUBRIC_VERSION",
    "RuleScorer",
    "SINGLE_RUBRIC",
    "ScoreResult",
    "make_scorer",
    "parse_judge_spec",
    "parse_list_reply",
    "parse_single_reply",
    "score_records",
]
