"""Teacher prompts for segment-level QA synthesis, and the parser of the teacher's reply.

Written in our own words to cover what the recipe's QA-generation template asks of the teacher
(paper Appendix D.3, Tables 12-13): a task definition per type, general restrictions (answerable
from the pages alone, verifiable absence, segment-scoped questions with an explicit anchor), the
page-indexing rule (use the page labels given in the request, not the numbers printed on the
pages), an evidence description tagged with four evidence types, a strict JSON object with one of
four answer types, and in-context exemplars (ours, text-only, sampled per request).

The reply is parsed here (:func:`parse_reply`); what is wrong with its *form* (no JSON, missing
keys, wrong types) raises :class:`ReplyFormatError`, which the client answers with one re-ask
(:func:`reask_message`). What is wrong with its *content* (pages outside the segment, no anchor,
an answer of the wrong type) is judged later by the synthesis stage, for every teacher alike.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

PROMPT_VERSION = "mvlm-vqa-prompt/v1"
VQA_TASKS = ("extract-single", "extract-multi", "reasoning")
ANSWER_FORMATS = ("String", "Integer", "Float", "List")
EVIDENCE_SOURCES = ("Text", "Layout", "Figure", "Table")


@dataclass(frozen=True)
class TaskPrompt:
    """The task-specific parts inserted into the common prompt."""

    title: str
    definition: str
    restriction: str


_LOOKUP = ("Ask for one explicit piece of information that is printed on the pages: a fact, a name, a date, "
           "a place, an author, a number, a list of items or a step of a procedure. It must be readable "
           "directly from running text, a table or a layout element such as a heading or a caption; the "
           "answer is copied, not computed.")

TASK_PROMPTS: dict[str, TaskPrompt] = {
    "extract-single": TaskPrompt(
        title="information lookup on one page",
        definition=_LOOKUP,
        restriction=("One page only: choose a single page among those shown and ask about that page alone. "
                     "Everything needed to answer must be on it, with no help from the other pages; "
                     "evidence_pages then holds exactly that one page."),
    ),
    "extract-multi": TaskPrompt(
        title="information lookup across pages",
        definition=_LOOKUP,
        restriction=("Several pages first: prefer a question whose answer needs facts from two or more "
                     "different pages, for instance a table whose header is on one page and the wanted row "
                     "on the next, or items of one kind gathered from several pages (other cross-page "
                     "patterns are welcome). Only when the pages share nothing worth connecting, fall back "
                     "to a question about one page."),
    ),
    "reasoning": TaskPrompt(
        title="quantitative reasoning",
        definition=("Ask a question that needs a processing step on information from the pages: a calculation "
                    "(arithmetic on printed numbers), a comparison (largest, smallest, which one is higher, "
                    "a trend) or a count (how many items, rows, mentions or figure elements meet a "
                    "condition). The answer must come out of that step; it must not be printed anywhere as "
                    "one piece of text."),
        restriction=("Combine at least two pieces of information: for instance the difference between two "
                     "values, the total of a column, which of three entries is largest. Whoever answers "
                     "must find two or more data points and put them together."),
    ),
}

GENERAL_RULES = (
    "Only the pages count: the answer must follow with certainty from what is visible on the pages shown, "
    "without outside knowledge or guessing.",
    "A question about something missing is allowed only when the pages make its absence certain.",
    "Stay inside the pages shown, and say where: the question must carry an anchor naming its page(s) "
    "(\"on Page 12\", \"on Pages 20, 21 and 25\") or its section (\"in the Methods section\"). The question "
    "will later be asked over the whole, much longer document, where an unanchored question can have "
    "other answers. Never write \"in the document\", \"in the whole file\" or \"across the document\".",
    "Page numbers: every image in this request comes after a label such as \"Page 14:\". Use these labels, "
    "and only these, for page numbers in the question, in the evidence description and in "
    "\"evidence_pages\" (write 14 for \"Page 14\"), whatever number is printed inside the page image.",
    "Write the question and the answer in English, quoting names, titles, numbers and units exactly as "
    "printed on the page.",
)

EVIDENCE_TYPES = (
    ("Text", "plain running text such as paragraphs and list items"),
    ("Layout", "text whose place on the page gives it a role: titles, section headings, running headers "
               "and footers, names of tables and figures"),
    ("Figure", "charts, plots, diagrams, photographs and other pictures"),
    ("Table", "data arranged in rows and columns"),
)

ANSWER_TYPES = (
    ("String", "a name, title, phrase or short sentence taken from the pages",
     "\"Maria Lopez\", \"Annual Safety Review\", \"The pump is replaced every two years.\""),
    ("Integer", "a whole number: a count, a year, a page or item number",
     "7, 1998, 250"),
    ("Float", "a number with a fractional part, including money amounts and percentages",
     "3.75, \"$12.40\", \"64.5%\""),
    ("List", "several items, names or values, as a JSON array of strings",
     "[\"Oslo\", \"Bergen\"], [\"Step 1: unplug\", \"Step 2: open the cover\"]"),
)

_JSON_SHAPE = ('{"question": "<question>", "answer": <answer>, "answer_format": "String|Integer|Float|List", '
               '"evidence_pages": [<page number>, ...], "evidence_sources": ["Text|Layout|Figure|Table", ...]}')


@dataclass(frozen=True)
class Exemplar:
    """An in-context example: the pages it pretends to show (described in words) and a model reply."""

    task: str
    pages: str
    evidence: str
    reply: dict[str, Any]

    def render(self, number: int) -> str:
        return (f"<example {number}>\nPages shown: {self.pages}\n[Evidence Description]: {self.evidence}\n"
                f"[JSON]: {json.dumps(self.reply, ensure_ascii=False)}\n</example {number}>")


# Our own exemplars (invented documents); the paper draws two per request from a curated pool.
EXEMPLARS: tuple[Exemplar, ...] = (
    Exemplar(
        "extract-single",
        "Pages 14 to 22 of a city water utility's annual report: sections \"4 Operations\" and \"5 Staff\".",
        "Page 17 holds Table 4.2 \"Treatment plants\" (Table), whose row \"North Ridge\" gives a daily capacity "
        "of 48.5 megalitres. No other page is needed.",
        {"question": "According to Table 4.2 on Page 17, what is the daily capacity of the North Ridge plant "
                     "in megalitres?", "answer": "48.5", "answer_format": "Float", "evidence_pages": [17],
         "evidence_sources": ["Table"]},
    ),
    Exemplar(
        "extract-single",
        "Pages 3 to 12 of a cookbook: the section \"Preserves\".",
        "The recipe heading \"Quick Lemon Curd\" (Layout) on Page 8 is followed by a step (Text) saying the "
        "mixture is stirred over low heat for 12 minutes.",
        {"question": "In the Quick Lemon Curd recipe on Page 8, for how many minutes is the mixture stirred "
                     "over low heat?", "answer": 12, "answer_format": "Integer", "evidence_pages": [8],
         "evidence_sources": ["Text", "Layout"]},
    ),
    Exemplar(
        "extract-multi",
        "Pages 30 to 41 of a clinical study report: sections \"6 Safety\" and \"7 Discussion\".",
        "Adverse events are listed in running text on Page 31 (nausea, headache) and continued on Page 33 "
        "(dizziness) (Text); the section heading \"6 Safety\" (Layout) on Page 30 scopes them.",
        {"question": "Which adverse events are named in the Safety section on Pages 31 and 33?",
         "answer": ["nausea", "headache", "dizziness"], "answer_format": "List", "evidence_pages": [31, 33],
         "evidence_sources": ["Text", "Layout"]},
    ),
    Exemplar(
        "extract-multi",
        "Pages 5 to 13 of a conference programme: section \"Day 2\".",
        "The chair of the morning session is printed under its title on Page 6 (Layout); the afternoon "
        "session's chair is printed on Page 11 (Layout).",
        {"question": "Who chairs the morning session on Page 6 and the afternoon session on Page 11?",
         "answer": ["Dr. Aiko Tanaka", "Prof. Samuel Osei"], "answer_format": "List",
         "evidence_pages": [6, 11], "evidence_sources": ["Layout"]},
    ),
    Exemplar(
        "reasoning",
        "Pages 44 to 55 of a retailer's annual report: section \"Financial Review\".",
        "The bar chart on Page 47 (Figure) shows online sales of 310 million in 2022; Table 9 on Page 49 "
        "(Table) lists 2023 online sales of 362 million. The difference is 362 - 310 = 52.",
        {"question": "In the Financial Review section, by how many million did online sales grow from 2022 "
                     "(chart on Page 47) to 2023 (Table 9 on Page 49)?", "answer": 52, "answer_format": "Integer",
         "evidence_pages": [47, 49], "evidence_sources": ["Figure", "Table"]},
    ),
    Exemplar(
        "reasoning",
        "Pages 9 to 17 of a hiking guide: section \"Northern Trails\".",
        "The trail table on Page 12 (Table) gives lengths of 6.4 km (Fox Loop), 11.2 km (Summit Path) and "
        "8.9 km (Lake Walk); the longest is Summit Path.",
        {"question": "Among the trails listed in the table on Page 12, which one is the longest?",
         "answer": "Summit Path", "answer_format": "String", "evidence_pages": [12], "evidence_sources": ["Table"]},
    ),
)


def system_prompt(task: str) -> str:
    """The fixed part of the prompt for one task type."""
    if task not in TASK_PROMPTS:
        raise ValueError(f"no prompt for task {task!r}; VQA tasks are {VQA_TASKS}")
    spec = TASK_PROMPTS[task]
    rules = "\n".join(f"{i}. {rule}" for i, rule in enumerate(GENERAL_RULES, 1))
    evidence = "\n".join(f"- {name}: {what}" for name, what in EVIDENCE_TYPES)
    answers = "\n".join(f"- {name}: {what}. For example {examples}." for name, what, examples in ANSWER_TYPES)
    return (
        "You write question-answer pairs that teach a model to read long documents. You are shown the page "
        "images of a run of consecutive pages (one or more sections) taken from a longer document, and you "
        "write exactly one question about them, with its answer.\n\n"
        f"# Task: {spec.title}\n{spec.definition}\n\n"
        f"# Rules\n{rules}\n{len(GENERAL_RULES) + 1}. {spec.restriction}\n\n"
        "# Reply\nReply in two parts, in this order.\n"
        "[Evidence Description]: explain where the answer is and how it follows, citing the elements you "
        "used (several paragraphs are fine). Name the type of every element you cite:\n"
        f"{evidence}\n"
        "[JSON]: then one JSON object and nothing after it:\n"
        f"{_JSON_SHAPE}\n\n"
        "The answer is of exactly one of these four types, and answer_format names it:\n"
        f"{answers}\n"
        "Use an Integer or Float type only when the answer is a single number; a List answer is a JSON array.\n"
    )


def choose_exemplars(task: str, count: int, rng: random.Random) -> list[Exemplar]:
    """``count`` exemplars, those of the task first (shuffled), then others."""
    own = [e for e in EXEMPLARS if e.task == task]
    other = [e for e in EXEMPLARS if e.task != task]
    rng.shuffle(own)
    rng.shuffle(other)
    return (own + other)[:max(0, count)]


def case_text(first_page: int, last_page: int, section_titles: Sequence[str]) -> str:
    """The instructions that precede the segment's page images."""
    titles = [t for t in section_titles if t and not t.startswith("(")]
    sections = ""
    if titles:
        sections = " The sections on these pages: " + "; ".join(f"\"{t}\"" for t in titles[:12]) + "."
    example_section = f"the \"{titles[-1]}\" section" if titles else "the Methods section"
    return (f"[Current case]\nThe images below are Pages {first_page} to {last_page} of the document; each "
            f"image follows its \"Page N:\" label.{sections} Write the pair from these pages only, and anchor "
            f"the question with its pages (\"Page {first_page + 1}\", \"Pages {first_page} and {last_page}\") or its "
            f"section ({example_section}).")


def build_messages(task: str, first_page: int, last_page: int, section_titles: Sequence[str],
                   page_images: Sequence[str], exemplars: Sequence[Exemplar]) -> list[dict[str, Any]]:
    """OpenAI chat messages: system prompt, then one user turn with the exemplars, the case text and
    every page image (as given: URLs or data URLs) after its ``Page N:`` label."""
    if len(page_images) != last_page - first_page + 1:
        raise ValueError(f"{len(page_images)} images for pages {first_page}..{last_page}")
    content: list[dict[str, Any]] = []
    if exemplars:
        shown = "\n\n".join(e.render(i) for i, e in enumerate(exemplars, 1))
        content.append({"type": "text", "text": "Examples of good replies (for other documents):\n\n" + shown})
    content.append({"type": "text", "text": case_text(first_page, last_page, section_titles)})
    for page, url in zip(range(first_page, last_page + 1), page_images):
        content.append({"type": "text", "text": f"Page {page}:"})
        content.append({"type": "image_url", "image_url": {"url": url}})
    return [{"role": "system", "content": system_prompt(task)}, {"role": "user", "content": content}]


def reask_message(error: str) -> dict[str, str]:
    """The follow-up turn after a reply whose JSON part could not be used."""
    return {"role": "user", "content": (
        f"Your reply could not be used: {error}. Reply again in the same two parts, and end with "
        f"[JSON]: followed by exactly one valid JSON object of this shape and nothing after it:\n{_JSON_SHAPE}")}


# ------------------------------------------------------------------------------------ parsing


class ReplyFormatError(ValueError):
    """The reply has no usable JSON object (answered with a re-ask)."""


@dataclass
class ParsedReply:
    question: str
    answer: Any  # str | int | float | list[str]
    answer_format: str
    evidence_pages: list[int]
    evidence_sources: list[str]
    evidence_description: str


_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_PAGE_WORD = re.compile(r"^\s*(?:page|p\.?)\s*", re.IGNORECASE)


def _json_objects(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    found, start = [], text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        start = text.find("{", end)
    return found


def _page_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = _PAGE_WORD.sub("", value).strip()
        if re.fullmatch(r"\d+", text):
            return int(text)
    raise ValueError


def parse_reply(text: Optional[str]) -> ParsedReply:
    """The teacher's QA pair from its reply text (the last JSON object with a ``question`` key)."""
    if not text or not text.strip():
        raise ReplyFormatError("the reply was empty")
    marker = text.rfind("[JSON]")
    body = _FENCE.sub(" ", text[marker:] if marker != -1 else text)
    candidates = [o for o in _json_objects(body) if "question" in o]
    if not candidates and marker != -1:
        candidates = [o for o in _json_objects(_FENCE.sub(" ", text)) if "question" in o]
    if not candidates:
        raise ReplyFormatError("no JSON object with a \"question\" key was found")
    obj = candidates[-1]
    missing = [k for k in ("question", "answer", "answer_format", "evidence_pages") if k not in obj]
    if missing:
        raise ReplyFormatError(f"the JSON object lacks {', '.join(missing)}")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise ReplyFormatError("\"question\" must be a non-empty string")
    answer = obj["answer"]
    if not isinstance(answer, (str, int, float, list)) or isinstance(answer, bool):
        raise ReplyFormatError("\"answer\" must be a string, a number or a list")
    if isinstance(answer, list) and not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                            for a in answer):
        raise ReplyFormatError("a List answer must hold strings or numbers")
    fmt = obj["answer_format"]
    canonical = {f.lower(): f for f in ANSWER_FORMATS}
    if not isinstance(fmt, str) or fmt.strip().lower() not in canonical:
        raise ReplyFormatError(f"\"answer_format\" must be one of {list(ANSWER_FORMATS)}")
    pages = obj["evidence_pages"]
    if isinstance(pages, (int, str)):
        pages = [pages]
    if not isinstance(pages, list):
        raise ReplyFormatError("\"evidence_pages\" must be a list of page numbers")
    try:
        evidence_pages = [_page_number(p) for p in pages]
    except ValueError:
        raise ReplyFormatError("\"evidence_pages\" must hold page numbers such as 12") from None
    sources = obj.get("evidence_sources", [])
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ReplyFormatError("\"evidence_sources\" must be a list of strings")
    description = text[:marker].replace("[Evidence Description]:", "").strip() if marker != -1 else ""
    return ParsedReply(question=question.strip(), answer=answer, answer_format=canonical[fmt.strip().lower()],
                       evidence_pages=evidence_pages, evidence_sources=[s.strip() for s in sources],
                       evidence_description=description[:4000])


__all__ = [
    "ANSWER_FORMATS",
    "EVIDENCE_SOURCES",
    "EXEMPLARS",
    "PROMPT_VERSION",
    "TASK_PROMPTS",
    "VQA_TASKS",
    "Exemplar",
    "ParsedReply",
    "ReplyFormatError",
    "build_messages",
    "case_text",
    "choose_exemplars",
    "parse_reply",
    "reask_message",
    "system_prompt",
]
