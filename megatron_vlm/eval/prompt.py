"""The evaluation prompt: labelled pages, the question naming its document, "Answer:" pre-filled.

User turn::

    <instruction>\\n\\n
    Document <id>, page <n>:<image>\\n          (one per page, in context order)
    <needle sentence>\\n                         (needle-in-a-haystack text items)
    <image>\\n                                   (needle pictures)
    Question about document <id>: <question>     (NIAH: "Question: <question>")

and the assistant turn starts with ``Answer:``; local backends render the chat template and append
it, OpenAI-compatible servers get it as a final assistant message with ``continue_final_message``.

Token counting is additive by construction: every text piece starts with a letter or follows a
special token, so the byte-level BPE never merges across pieces and
``fixed + sum(item costs)`` equals the tokenized prompt length (checked in the tests).
"""

from __future__ import annotations

import base64
import mimetypes
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_vlm.eval.data import ContextItem

DOCQA_INSTRUCTION = (
    "Below are pages from one or more documents. Each page is introduced by its document id and "
    "page number. Answer the question that comes after the pages, using only the document it names. "
    "Keep the answer short: a number, a word, a short phrase, or a list of items. If that document "
    "does not contain the answer, reply \"Not answerable\"."
)
NIAH_INSTRUCTION = (
    "Below are pages from several documents, with a few extra sentences or pictures placed among "
    "them. Read all of it and answer the question that comes after the pages. Keep the answer short."
)
ANSWER_PREFIX = "Answer:"


PROMPT_FORMATS = ("auto", "mmlb", "ours")


@dataclass
class PromptConfig:
    doc_label_chars: int = 15  # document ids are shown cut to this many characters (0: whole)
    answer_prefix: str = ANSWER_PREFIX
    # auto: MMLongBench's own prompt (megatron_vlm/eval/mmlb_prompt.py) for MMLongBench document-QA
    # data, ours (this module) for the rest; mmlb / ours: that one wherever it applies
    format: str = "ours"
    official: Any = None  # mmlb_prompt.OfficialDocQAPrompt, read from the user's checkout
    mmlb_datasets: tuple = ()  # dataset names loaded from MMLongBench files (besides the official keys)
    mmniah: Any = None  # mmniah.OfficialNIAHPrompts: MM-NIAH's only prompt, read from the user's checkout


def uses_official_prompt(instance, cfg: PromptConfig) -> bool:
    """Whether ``instance`` gets MMLongBench's prompt: its document-QA data under ``auto`` or ``mmlb``."""
    if cfg.format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {cfg.format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    if cfg.format == "ours" or instance.task != "docqa":
        return False
    from megatron_vlm.eval.judge import is_mmlb_dataset
    return is_mmlb_dataset(instance.dataset, cfg.mmlb_datasets)


def doc_label(doc_id: str, cfg: PromptConfig) -> str:
    return doc_id[:cfg.doc_label_chars] if cfg.doc_label_chars > 0 else doc_id


def page_label(item: ContextItem, cfg: PromptConfig) -> str:
    return f"Document {doc_label(item.doc_id, cfg)}, page {item.page}:"


def question_text(task: str, question: str, gold_doc_id: Optional[str], cfg: PromptConfig) -> str:
    if task == "docqa" and gold_doc_id:
        return f"Question about document {doc_label(gold_doc_id, cfg)}: {question}"
    return f"Question: {question}"


def user_content(items: Sequence[ContextItem], task: str, question: str, gold_doc_id: Optional[str],
                 cfg: PromptConfig) -> list[dict[str, Any]]:
    """The user turn as content items (``{"type": "image", "image": path}`` for images)."""
    instruction = DOCQA_INSTRUCTION if task == "docqa" else NIAH_INSTRUCTION
    content: list[dict[str, Any]] = [{"type": "text", "text": instruction + "\n\n"}]
    for item in items:
        if item.kind == "page":
            content.append({"type": "text", "text": page_label(item, cfg)})
            content.append({"type": "image", "image": item.image})
            content.append({"type": "text", "text": "\n"})
        elif item.kind == "image":
            content.append({"type": "image", "image": item.image})
            content.append({"type": "text", "text": "\n"})
        elif item.kind == "text":
            content.append({"type": "text", "text": (item.text or "").strip() + "\n"})
        else:
            raise ValueError(f"unknown context item kind {item.kind!r}")
    content.append({"type": "text", "text": question_text(task, question, gold_doc_id, cfg)})
    return _merge_texts(content)


def _merge_texts(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    return merged


def chat_messages(items: Sequence[ContextItem], task: str, question: str, gold_doc_id: Optional[str],
                  cfg: PromptConfig) -> list[dict[str, Any]]:
    """Chat messages for a local chat template; the last one is the pre-filled assistant turn."""
    return [{"role": "user", "content": user_content(items, task, question, gold_doc_id, cfg)},
            {"role": "assistant", "content": cfg.answer_prefix}]


def instance_messages(instance, cfg: PromptConfig) -> list[dict[str, Any]]:
    """The chat of a ``build.Instance``: MMLongBench's own prompt where ``cfg`` asks for it, else
    ``chat_messages``; MMLongBench's MM-NIAH always gets its official prompt."""
    if instance.task == "mmniah":
        from megatron_vlm.eval.mmniah import niah_messages
        return niah_messages(cfg.mmniah, instance)
    if uses_official_prompt(instance, cfg):
        from megatron_vlm.eval.mmlb_prompt import instance_official_messages
        return instance_official_messages(instance, cfg.official)
    return chat_messages(instance.items, instance.task, instance.question, instance.gold_doc_id, cfg)


def render_prompt(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The prompt text with one ``<|image_pad|>`` per image, ending in the pre-filled answer prefix."""
    def strip(content):  # the template needs no paths
        if isinstance(content, str):
            return content
        return [{"type": "image"} if c["type"] == "image" else {"type": "text", "text": c["text"]} for c in content]

    plain = [{"role": m["role"], "content": strip(m["content"])} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, continue_final_message=True)


def image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def openai_messages(messages: list[dict[str, Any]], images: str = "data") -> list[dict[str, Any]]:
    """The same chat for an OpenAI-compatible server: images as data URLs (``images="data"``) or
    ``file://`` paths (``"path"``; vLLM needs ``--allowed-local-media-path``)."""
    out = []
    for m in messages:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for c in m["content"]:
            if c["type"] == "text":
                parts.append({"type": "text", "text": c["text"]})
            elif images == "data":
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(c["image"])}})
            elif images == "path":
                parts.append({"type": "image_url", "image_url": {"url": "file://" + os.path.abspath(c["image"])}})
            else:
                raise ValueError(f"images must be 'data' or 'path', not {images!r}")
        out.append({"role": m["role"], "content": parts})
    return out


class TokenCounter:
    """Prompt length in tokens = page tokens (+2 per image for vision start/end) + text tokens."""

    def __init__(self, tokenizer, cfg: PromptConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._cache: dict[str, int] = {}
        self._docs: dict[tuple[str, int, str], tuple[list[ContextItem], int]] = {}

    def for_example(self, example):
        """The counter of the prompt ``example`` is really asked with: MMLongBench's own (an
        ``mmlb_prompt.OfficialTokenCounter``) where ``cfg`` gives its data that prompt, else this one."""
        if not uses_official_prompt(example, self.cfg):
            return self
        from megatron_vlm.eval.mmlb_prompt import OfficialTokenCounter, official_doc_name
        if self.cfg.official is None:
            raise ValueError(f"{example.dataset}: the official MMLongBench prompt needs your MMLongBench "
                             "checkout (--mmlb-dir DIR) to count its tokens, or --prompt-format ours")
        return OfficialTokenCounter(self, official_doc_name(example, self.cfg.official))

    def text(self, text: str) -> int:
        if text not in self._cache:
            self._cache[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def fixed(self, task: str, question: str, gold_doc_id: Optional[str]) -> int:
        """Tokens of the prompt with no context items (template, instruction, question, prefix)."""
        rendered = render_prompt(self.tokenizer, chat_messages([], task, question, gold_doc_id, self.cfg))
        return len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def item(self, item: ContextItem) -> int:
        if item.kind == "page":
            return self.text(page_label(item, self.cfg)) + item.tokens + 2 + self.text("\n")
        if item.kind == "image":
            return item.tokens + 2 + self.text("\n")
        return self.text((item.text or "").strip() + "\n")

    def items(self, items: Sequence[ContextItem]) -> int:
        return sum(self.item(i) for i in items)

    def document(self, doc, role: str) -> tuple[list[ContextItem], int]:
        """A whole document's page items and their cost, computed once per document and role
        (contexts share the items; nothing mutates them)."""
        key = (doc.doc_id, len(doc.pages), role)
        if key not in self._docs:
            items = [ContextItem.from_page(doc.doc_id, p, role) for p in doc.pages]
            self._docs[key] = (items, self.items(items))
        return self._docs[key]


__all__ = [
    "ANSWER_PREFIX",
    "DOCQA_INSTRUCTION",
    "NIAH_INSTRUCTION",
    "PROMPT_FORMATS",
    "PromptConfig",
    "TokenCounter",
    "chat_messages",
    "doc_label",
    "image_data_url",
    "instance_messages",
    "openai_messages",
    "page_label",
    "render_prompt",
    "user_content",
    "uses_official_prompt",
]
