"""MMLongBench v1.1's LLM-judged document-QA score (``--judge mmlb:URL[,model=NAME],prompts=DIR``).

Reference: github.com/EdinburghNLP/MMLongBench (the protocol the paper reports, Appendix B.1).
The benchmark's prompt texts are **not** in this repository: they are read at run time from the
user's checkout ``DIR`` -- the string constants of ``DIR/utils_prompt.py`` and the question prefix
in ``DIR/data.py`` -- by parsing the files with :mod:`ast` (never importing or executing them).

What the official run does, and where it is mirrored here (our code, same behaviour):

=================================================================  ==================================
official                                                           here
=================================================================  ==================================
data.py ``load_doc_qa_with_llm_judge``: the question the judge     :func:`judge_question`
sees is a prefix naming ``doc_name`` (``str.format``, cut to 15
characters by the template) + the question
eval.py: ``"Answer:"`` prepended to the output, then               :func:`judge_prediction`
utils.py ``parse_output(prefix="Answer:")``
utils.py ``calculate_metrics(..., "doc_qa_llm")``: the list judge  :meth:`MMLBJudge.request`
iff ``answer_format == "List"``, else the single-answer judge
``eval_docqa_score_with_llm_judge``: one user message,             :data:`SINGLE_PROMPT` +
``DOC_QA_JUDGE_PROMPT + CURRENT_CASE_PROMPT.format(question=,      :data:`SINGLE_CASE`
reference=, prediction=)``, ``max_tokens=256``, nothing else
(no temperature: the server's default), ``call_api(limit=5)``
``eval_docqa_list_score_with_llm_judge``: the same with            :data:`LIST_PROMPT` +
``DOC_QA_LIST_F1_JUDGE_PROMPT + CURRENT_LIST_CASE_PROMPT``         :data:`LIST_CASE`
``parse_judge_output`` + the score choice: ``[Score]: x points``   :func:`single_score`
first, else ``answer_score`` of the JSON, else 0
``robust_json_extraction``: the object after the first             :func:`extract_json`
``[JSON]:``; if that fails to decode, each key by a regex
``parse_list_judge_output`` + the list F1: recall = covered /      :func:`list_score`,
``len(json.loads(gold))``, precision = covered / answer count,     :func:`list_f1_from_counts`
F1 clipped to [0, 1], 0 when covered <= 0 or a count is missing
``eval.py``: the dataset score is the mean x 100                   ``report.summarize``
=================================================================  ==================================

An unparseable reply scores 0, as officially (never a fallback to the rules). Where the official
code would raise (a List gold that is not JSON, an answer count of 0 with items covered, a count
that is not a number), the record scores 0 and its ``judge.note`` says why; a List gold written as
a Python literal (``['a', 'b']``) is counted as that list, with a note. Every request is cached in
the judge cache (resumable) under a key of the exact prompt and judge model, and identical prompts
judged in parallel send one request. Needle records (``task: niah``) are scored by our rules;
records whose generation failed score 0 without a request (the official run skips them).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import string
import threading
from dataclasses import dataclass
from typing import Any, Optional

from megatron_vlm.eval.backends import BackendError, OpenAIClient
from megatron_vlm.eval.judge import JudgeCache, JudgeError, RuleScorer, ScoreResult
from megatron_vlm.eval.mmlb_rules import ANSWER_PREFIX, parse_answer
from megatron_vlm.eval.scoring import normalize_format

PROTOCOL = "mmlb-v1.1"
PROMPT_FILE = "utils_prompt.py"
DATA_FILE = "data.py"
# the names of the official constants (utils.py imports exactly these four)
SINGLE_PROMPT, SINGLE_CASE = "DOC_QA_JUDGE_PROMPT", "CURRENT_CASE_PROMPT"
LIST_PROMPT, LIST_CASE = "DOC_QA_LIST_F1_JUDGE_PROMPT", "CURRENT_LIST_CASE_PROMPT"
CASE_FIELDS = ("question", "reference", "prediction")
QUESTION_LOADER = "load_doc_qa_with_llm_judge"  # the data.py function that builds the judged question
MAX_TOKENS = 256
ATTEMPTS = 5  # call_api(limit=5): five tries in all
SINGLE_KEYS = ("answer_score",)
LIST_KEYS = ("student_answer_count", "covered_count")
_SCORE_LINE = re.compile(r"\[Score\]:\s*(\d+)\s*points?")
_JSON_START = re.compile(r"\[JSON\]:.*?(\{)", re.DOTALL)


class PromptFileError(ValueError):
    """The MMLongBench checkout does not hold the judge prompts in the expected form."""


class OfficialCodeWouldFail(ValueError):
    """The official scorer raises on this case; we score 0 and say why."""


# ------------------------------------------------------------------------- reading the checkout
def _string_value(node: ast.AST) -> Optional[str]:
    """A string literal, or literals joined by ``+`` (implicit concatenation is one literal)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left), _string_value(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _parse(path: str) -> ast.Module:
    if not os.path.isfile(path):
        raise PromptFileError(f"{path} does not exist; prompts= must be your MMLongBench checkout")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        return ast.parse(source, filename=path)
    except SyntaxError as err:
        raise PromptFileError(f"{path} is not valid Python ({err.msg}, line {err.lineno})") from None


def string_constants(path: str) -> dict[str, str]:
    """Module-level ``NAME = "..."`` assignments of a Python file, read with :mod:`ast` (the file is
    never imported or run)."""
    out: dict[str, str] = {}
    for node in _parse(path).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        text = _string_value(value)
        if text is None:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                out[target.id] = text
    return out


def format_fields(template: str) -> set[str]:
    return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(template)
            if field is not None}


def question_prefix(path: str, function: str = QUESTION_LOADER) -> tuple[str, str]:
    """(template, record field) of the judged question in the official loader: inside ``function``
    the assignment ``question = "<template>".format(doc_id=doc_id) + question``, and the field that
    ``doc_id`` is read from (``doc_id = sample["<field>"]``)."""
    tree = _parse(path)
    loader = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if loader is None:
        raise PromptFileError(f"{path}: no function {function}() (the MMLongBench v1.1 LLM-judge loader)")
    template, field = None, None
    for node in ast.walk(loader):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name, value = node.targets[0].id, node.value
        if (name == "question" and isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)
                and isinstance(value.left, ast.Call) and isinstance(value.left.func, ast.Attribute)
                and value.left.func.attr == "format" and isinstance(value.right, ast.Name)
                and value.right.id == "question"):
            text = _string_value(value.left.func.value)
            if text is not None and [k.arg for k in value.left.keywords] == ["doc_id"]:
                template = text
        if (name == "doc_id" and isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Constant)
                and isinstance(value.slice.value, str)):
            field = value.slice.value
    if template is None:
        raise PromptFileError(f"{path}: {function}() does not build the question as "
                              "'question = \"...\".format(doc_id=doc_id) + question'")
    if format_fields(template) != {"doc_id"}:
        raise PromptFileError(f"{path}: the question prefix has fields {sorted(format_fields(template))}, "
                              "expected only doc_id")
    return template, field or "doc_name"


@dataclass(frozen=True)
class OfficialPrompts:
    single: str          # DOC_QA_JUDGE_PROMPT (used as is)
    single_case: str     # CURRENT_CASE_PROMPT (str.format with question, reference, prediction)
    list: str            # DOC_QA_LIST_F1_JUDGE_PROMPT
    list_case: str       # CURRENT_LIST_CASE_PROMPT
    question_prefix: str  # str.format template with {doc_id...}
    doc_field: str       # the record field doc_id comes from (doc_name)
    source: str          # the checkout
    digest: str          # SHA-256 of all of the above texts (part of every cache key)


def checkout_folder(checkout: str, file_name: str, flag: str) -> str:
    """The MMLongBench checkout folder a user named (the folder, or ``file_name`` inside it)."""
    checkout = os.path.expanduser(checkout)
    if os.path.isfile(checkout) and os.path.basename(checkout) == file_name:
        checkout = os.path.dirname(checkout) or "."
    if not os.path.isdir(checkout):
        raise PromptFileError(f"{flag}{checkout}: not a folder; give your MMLongBench checkout")
    return checkout


def load_official_prompts(checkout: str) -> OfficialPrompts:
    """The v1.1 judge prompts of an MMLongBench checkout (``utils_prompt.py`` and ``data.py``)."""
    checkout = checkout_folder(checkout, PROMPT_FILE, "prompts=")
    prompt_path = os.path.join(checkout, PROMPT_FILE)
    constants = string_constants(prompt_path)
    names = (SINGLE_PROMPT, SINGLE_CASE, LIST_PROMPT, LIST_CASE)
    missing = [n for n in names if n not in constants]
    if missing:
        raise PromptFileError(f"{prompt_path}: no string constant(s) {missing} (MMLongBench v1.1 has them)")
    for name in (SINGLE_CASE, LIST_CASE):
        fields = format_fields(constants[name])
        if not fields <= set(CASE_FIELDS) or "prediction" not in fields:
            raise PromptFileError(f"{prompt_path}: {name} has placeholders {sorted(fields)}; expected "
                                  f"{{question}}, {{reference}}, {{prediction}}")
    template, field = question_prefix(os.path.join(checkout, DATA_FILE))
    texts = [constants[n] for n in names] + [template, field]
    digest = hashlib.sha256(json.dumps(texts).encode("utf-8")).hexdigest()
    return OfficialPrompts(constants[SINGLE_PROMPT], constants[SINGLE_CASE], constants[LIST_PROMPT],
                           constants[LIST_CASE], template, field, os.path.abspath(checkout), digest)


# ------------------------------------------------------------------------- the request
def judge_question(prompts: OfficialPrompts, question: str, doc_name: Optional[str]) -> str:
    """The question as the official judge sees it: the loader's prefix naming the document, then
    the question (without a document name, the question alone)."""
    if not doc_name:
        return question
    return prompts.question_prefix.format(doc_id=str(doc_name)) + question


def judge_prediction(prediction: Any) -> str:
    """The student answer: the official run prepends "Answer:" to the model's output and reads the
    text after the first "Answer:" (one repeated prefix dropped)."""
    return parse_answer(ANSWER_PREFIX + ("" if prediction is None else str(prediction)))


def reference_text(answer: Any) -> str:
    """The gold as ``str.format`` writes it; a list gold (our own data) as the JSON string the
    benchmark files hold."""
    if isinstance(answer, (list, dict)):
        return json.dumps(answer, ensure_ascii=False)
    return format(answer)


def is_list_case(answer_format: Any) -> bool:
    try:
        return normalize_format(answer_format) == "List"
    except ValueError:
        return False


# ------------------------------------------------------------------------- reading replies
def extract_json(text: str, keys: tuple[str, ...]) -> Any:
    """The JSON object after the first ``[JSON]:``; if there is none or it does not decode, a dict
    of each key found as ``"key": <number>`` anywhere (as a float)."""
    text = text or ""
    match = _JSON_START.search(text)
    if match:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[match.start(1):])
            return obj
        except ValueError:
            pass
    found: dict[str, float] = {}
    for key in keys:
        hit = re.search(r'"' + re.escape(key) + r'"\s*:\s*(-?\d+(?:\.\d+)?)', text)
        if hit:
            found[key] = float(hit.group(1))
    return found


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def single_score(text: str) -> tuple[float, str, Optional[str]]:
    """(score, how, note) of a single-answer reply: ``[Score]: x points`` first, else
    ``answer_score`` of the JSON, else 0 (how = "score line", "json" or "unparsed")."""
    hit = _SCORE_LINE.search(text or "")
    if hit:
        return float(int(hit.group(1))), "score line", None
    data = extract_json(text, SINGLE_KEYS)
    if isinstance(data, dict) and "answer_score" in data:
        value = _number(data["answer_score"])
        if value is None:
            return 0.0, "unparsed", f"official code would fail: answer_score {data['answer_score']!r} is not a number"
        return value, "json", None
    return 0.0, "unparsed", None


def reference_count(answer: Any) -> tuple[int, Optional[str]]:
    """Items in a List gold as the official code counts them (``len(json.loads(gold))``)."""
    if isinstance(answer, (list, tuple)):
        return len(answer), None
    try:
        return len(json.loads(answer)), None
    except (TypeError, ValueError) as err:
        try:
            value = ast.literal_eval(str(answer))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (list, tuple)):
            return len(value), f"official code would fail (gold is not JSON: {err}); counted as a Python list"
        raise OfficialCodeWouldFail(f"the List gold {str(answer)[:80]!r} is not JSON ({err})") from None


def list_f1_from_counts(reference_items: float, answer_items: float, covered: float) -> float:
    """The official list F1: 0 when ``covered <= 0``; else recall = covered / reference items,
    precision = covered / answer items, F1 = 2PR / (P + R) clipped to [0, 1] (so a judge that
    reports more covered items than the answer has still gets at most 1)."""
    if covered <= 0:
        return 0.0
    try:
        recall = covered / reference_items
        precision = covered / answer_items
        return max(min(2 * recall * precision / (recall + precision), 1.0), 0.0)
    except ZeroDivisionError:
        raise OfficialCodeWouldFail(f"division by zero (reference items {reference_items:g}, "
                                    f"answer items {answer_items:g}, covered {covered:g})") from None


def list_score(text: str, answer: Any) -> tuple[float, str, Optional[str], dict]:
    """(score, how, note, counts) of a list reply scored against the gold list."""
    data = extract_json(text, LIST_KEYS)
    if not (isinstance(data, dict) and all(k in data for k in LIST_KEYS)):
        return 0.0, "unparsed", None, {}
    answered, covered = _number(data["student_answer_count"]), _number(data["covered_count"])
    counts = {"answer_items": data["student_answer_count"], "covered_items": data["covered_count"]}
    if answered is None or covered is None:
        return 0.0, "json", "official code would fail: a count is not a number", counts
    if covered <= 0:
        return 0.0, "json", None, counts
    try:
        n_ref, note = reference_count(answer)
        counts["reference_items"] = n_ref
        return list_f1_from_counts(n_ref, answered, covered), "json", note, counts
    except OfficialCodeWouldFail as err:
        return 0.0, "json", f"official code would fail: {err}", counts


# ------------------------------------------------------------------------- the scorer
class MMLBJudge:
    """MMLongBench v1.1's judge on an OpenAI-compatible endpoint, cached and deduplicated."""

    def __init__(self, url: str, prompts: str, model: Optional[str] = None, cache_path: Optional[str] = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 300.0, parallel: int = 4,
                 attempts: int = ATTEMPTS):
        self.prompts = load_official_prompts(prompts)
        self.client = OpenAIClient(url, api_key_env, timeout, max(0, attempts - 1), model)
        self.name = f"mmlb-judge:{self.client.model}"
        self.parallel = max(1, parallel)
        self.cache = JudgeCache(cache_path)
        self.rules = RuleScorer()
        self.calls = 0  # requests answered (cache hits and shared keys cost none)
        self._lock = threading.Lock()

    def request(self, record: dict) -> tuple[str, str, Optional[str]]:
        """(kind, the one user message, note) the official run would send for this record."""
        kind = "list" if is_list_case(record.get("answer_format")) else "single"
        doc_name = record.get(self.prompts.doc_field) or record.get("gold_doc_id")
        note = None
        if not record.get(self.prompts.doc_field):
            note = (f"no {self.prompts.doc_field}: the question names gold_doc_id" if doc_name
                    else f"no {self.prompts.doc_field}: the question is sent without the document prefix")
        question = judge_question(self.prompts, str(record.get("question", "")), doc_name)
        head, case = (self.prompts.list, self.prompts.list_case) if kind == "list" else \
            (self.prompts.single, self.prompts.single_case)
        content = head + case.format(question=question, reference=reference_text(record.get("answer")),
                                     prediction=judge_prediction(record.get("prediction")))
        return kind, content, note

    def _key(self, content: str) -> str:
        payload = json.dumps([PROTOCOL, self.client.model, content], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _ask(self, kind: str, content: str) -> dict:
        try:
            text = self.client.chat([{"role": "user", "content": content}], max_tokens=MAX_TOKENS)
        except BackendError as err:
            raise JudgeError(f"judge {self.client.url}: {err}") from None
        with self._lock:
            self.calls += 1
        return {"protocol": PROTOCOL, "judge": self.client.model, "kind": kind, "prompts": self.prompts.digest,
                "raw": text}

    def score_record(self, record: dict) -> ScoreResult:
        if record.get("task", "docqa") != "docqa":
            return self.rules.score(str(record.get("question", "")), record.get("answer"),
                                    record.get("answer_format"), record.get("prediction") or "")
        if record.get("error"):
            return ScoreResult(0.0, "error", {"protocol": PROTOCOL, "note": "generation failed: scored 0, not judged"})
        kind, content, note = self.request(record)
        entry, how = self.cache.once(self._key(content), lambda: self._ask(kind, content))
        raw = entry.get("raw") or ""
        detail: dict[str, Any] = {"protocol": PROTOCOL, "kind": kind, "cached": how != "new"}
        if kind == "list":
            score, parsed_by, problem, counts = list_score(raw, record.get("answer"))
            detail.update(counts)
        else:
            score, parsed_by, problem = single_score(raw)
        detail["parsed_by"] = parsed_by
        notes = [n for n in (note, problem) if n]
        if notes:
            detail["note"] = "; ".join(notes)
        if parsed_by == "unparsed":
            detail["judge_reply"] = raw[-300:]
            return ScoreResult(score, f"{self.name} (reply unparsed: 0)", detail)
        return ScoreResult(score, self.name, detail)

    def score(self, question: str, answer: Any, answer_format: str, prediction: str) -> ScoreResult:
        return self.score_record({"question": question, "answer": answer, "answer_format": answer_format,
                                  "prediction": prediction})

    def close(self) -> None:
        self.cache.close()


__all__ = [
    "MMLBJudge",
    "OfficialCodeWouldFail",
    "OfficialPrompts",
    "PromptFileError",
    "extract_json",
    "judge_prediction",
    "judge_question",
    "list_f1_from_counts",
    "list_score",
    "load_official_prompts",
    "question_prefix",
    "reference_count",
    "single_score",
    "string_constants",
]
