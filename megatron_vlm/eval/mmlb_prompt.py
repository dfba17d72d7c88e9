"""MMLongBench's own document-QA prompt for the model under test (``--prompt-format mmlb``).

The official run builds it in ``data.py`` ``load_doc_qa`` (``load_doc_qa_with_llm_judge`` when its
LLM judge is on; both build the same prompt) and the model wrappers turn it into chat messages
(e.g. ``vlm_model/qwen2_vl.py`` ``format_chat`` / ``prepare_inputs``):

* each page image becomes ``item_template`` filled with ``doc_id`` = the name of the folder holding
  the page image (and, in older checkouts, ``page_id`` = what follows the last "page" in the path,
  up to the dot); the page strings are joined by blank lines into ``{context}``;
* the question is the question-prefix template filled with the record's ``doc_name``, then the
  question itself;
* ``user_template`` is filled with ``context`` and ``question``; the text is cut at every
  ``<image>`` and the page images are put there, in ``page_list`` order (one per placeholder);
* there is no system message; the assistant turn is ``system_template`` ("Answer:"), which the
  model continues (``continue_final_message``).

The template texts are the benchmark's and are not shipped here: they are read at run time from
the user's MMLongBench checkout (``--mmlb-dir DIR``), by parsing ``data.py`` with :mod:`ast`
(never importing or running it), like the judge prompts in :mod:`megatron_vlm.eval.mmlb_judge`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from megatron_vlm.eval.mmlb_judge import (DATA_FILE, PromptFileError, _parse, _string_value, checkout_folder,
                                          format_fields,
                                          question_prefix)

PROMPT_LOADER = "load_doc_qa"  # the data.py function whose templates the model under test sees
IMAGE_TOKEN = "<image>"
TEMPLATE_NAMES = ("user_template", "item_template", "system_template")


@dataclass(frozen=True)
class OfficialDocQAPrompt:
    user_template: str    # str.format with context and question; holds no <image> itself
    item_template: str    # one per page: str.format with doc_id (and page_id); holds one <image>
    system_template: str  # the pre-filled assistant turn ("Answer:")
    question_prefix: str  # str.format with doc_id, put before the question
    doc_field: str        # the record field the prefix's doc_id is read from (doc_name)
    source: str           # the checkout
    digest: str           # SHA-256 of the texts above (part of the predictions' fingerprint)


def _function_strings(path: str, function: str) -> dict[str, str]:
    """``name = "literal"`` assignments inside ``function`` of a Python file (read with ast)."""
    tree = _parse(path)
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if node is None:
        raise PromptFileError(f"{path}: no function {function}() (MMLongBench's document-QA loader)")
    out: dict[str, str] = {}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assign) and len(sub.targets) == 1 and isinstance(sub.targets[0], ast.Name):
            text = _string_value(sub.value)
            if text is not None:
                out.setdefault(sub.targets[0].id, text)
    return out


def load_official_docqa_prompt(checkout: str, function: str = PROMPT_LOADER) -> OfficialDocQAPrompt:
    """The model-under-test document-QA prompt of an MMLongBench checkout (``DIR/data.py``)."""
    checkout = checkout_folder(checkout, DATA_FILE, "--mmlb-dir ")
    path = os.path.join(checkout, DATA_FILE)
    strings = _function_strings(path, function)
    missing = [n for n in TEMPLATE_NAMES if n not in strings]
    if missing:
        raise PromptFileError(f"{path}: {function}() assigns no string {missing}")
    user, item, system = (strings[n] for n in TEMPLATE_NAMES)
    if format_fields(user) != {"context", "question"} or IMAGE_TOKEN in user:
        raise PromptFileError(f"{path}: {function}() user_template has fields {sorted(format_fields(user))}; "
                              "expected {context} and {question} and no <image>")
    if not format_fields(item) <= {"doc_id", "page_id"} or item.count(IMAGE_TOKEN) != 1:
        raise PromptFileError(f"{path}: {function}() item_template must hold one <image> and only "
                              f"{{doc_id}}/{{page_id}} fields, not {item!r}")
    if format_fields(system):
        raise PromptFileError(f"{path}: {function}() system_template has fields; expected plain text")
    prefix, field = question_prefix(path, function)
    texts = [user, item, system, prefix, field]
    digest = hashlib.sha256(json.dumps(texts).encode("utf-8")).hexdigest()
    return OfficialDocQAPrompt(user, item, system, prefix, field, os.path.abspath(checkout), digest)


def page_fields(image_path: str) -> dict[str, str]:
    """``doc_id`` and ``page_id`` of a page image as the official loader reads them from its path."""
    parts = image_path.replace(os.sep, "/").split("/")
    return {"doc_id": parts[-2] if len(parts) > 1 else "",
            "page_id": image_path.split("page")[-1].split(".")[0]}


PAGE_SEPARATOR = "\n\n"  # load_doc_qa: passage_text = "\n\n".join(page_prompt_list)


def user_text(prompt: OfficialDocQAPrompt, images: Sequence[str], question: str, doc_name: str) -> str:
    """The user turn as one string with an ``<image>`` per page, in ``images`` order."""
    context = PAGE_SEPARATOR.join(prompt.item_template.format(**page_fields(p)) for p in images)
    full_question = prompt.question_prefix.format(doc_id=doc_name) + question
    return prompt.user_template.format(context=context, question=full_question)


def official_messages(prompt: OfficialDocQAPrompt, images: Sequence[str], question: str,
                      doc_name: str) -> list[dict[str, Any]]:
    """Chat messages: the user turn cut at each ``<image>`` (images in order; empty text pieces,
    which render as nothing, are left out), then the pre-filled assistant turn."""
    content: list[dict[str, Any]] = []
    remaining = list(images)
    for piece in re.split(f"({re.escape(IMAGE_TOKEN)})", user_text(prompt, images, question, doc_name)):
        if piece == IMAGE_TOKEN:
            if not remaining:
                raise ValueError("the prompt holds more <image> placeholders than the record has pages")
            content.append({"type": "image", "image": remaining.pop(0)})
        elif piece:
            content.append({"type": "text", "text": piece})
    if remaining:
        raise ValueError(f"{len(remaining)} page image(s) have no <image> placeholder in the prompt")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": prompt.system_template}]


def instance_official_messages(instance, prompt: Optional[OfficialDocQAPrompt]) -> list[dict[str, Any]]:
    if prompt is None:
        raise ValueError(f"{instance.dataset}: the official MMLongBench prompt (--prompt-format mmlb, the "
                         "default for MMLongBench data) needs your MMLongBench checkout: give --mmlb-dir DIR "
                         "(git clone https://github.com/EdinburghNLP/MMLongBench), or --prompt-format ours")
    images = [i.image for i in instance.items if i.image]
    if any(i.kind != "page" for i in instance.items):
        raise ValueError(f"{instance.key}: the official document-QA prompt has only pages")
    return official_messages(prompt, images, instance.question, official_doc_name(instance, prompt))


def official_doc_name(example_or_instance, prompt: OfficialDocQAPrompt) -> str:
    """The name the question prefix shows: the record's ``doc_name`` (else the gold document's id)."""
    doc_name = example_or_instance.meta.get(prompt.doc_field)
    if doc_name is None:
        doc = getattr(example_or_instance, "doc", None)
        doc_name = getattr(example_or_instance, "gold_doc_id", None) or (doc.doc_id if doc is not None else "")
    return str(doc_name or "")


class OfficialTokenCounter:
    """Prompt length in tokens under MMLongBench's own prompt, for one example's question: the same
    interface as ``prompt.TokenCounter`` (``fixed`` + additive per-page ``item`` costs), so length
    budgets count the text the model is really sent.

    Additivity: each page image renders as ``<|vision_start|><|image_pad|>..<|vision_end|>``
    (special tokens), so the text between two images -- the separator and the next page's
    ``item_template`` text ("\n\nDocument <id>: ") -- is tokenized on its own. A page costs
    ``T(separator + its text) + image tokens + 2``; ``fixed`` is the rendered prompt with one probe
    page minus that probe's cost. Exact when the separator and the first page's text split from
    their neighbours in pre-tokenization (true of the official template and Qwen's tokenizer;
    checked against full renderings in tests/unit/test_mmlb_prompt.py)."""

    def __init__(self, base, doc_name: str):
        self.base = base  # prompt.TokenCounter: tokenizer, config and its text-token cache
        self.tokenizer = base.tokenizer
        self.cfg = base.cfg
        self.prompt: OfficialDocQAPrompt = base.cfg.official
        self.doc_name = doc_name
        self._docs = base.__dict__.setdefault("_official_docs", {})

    def text(self, text: str) -> int:
        return self.base.text(text)

    def _page_text(self, image: str) -> int:
        before, after = self.prompt.item_template.split(IMAGE_TOKEN)
        fields = page_fields(image)
        after = after.format(**fields)
        return self.text(PAGE_SEPARATOR + before.format(**fields)) + (self.text(after) if after else 0)

    def fixed(self, task: str, question: str, gold_doc_id: Optional[str]) -> int:
        from megatron_vlm.eval.prompt import render_prompt

        probe = f"/probe/{gold_doc_id or 'document'}/probe_page1.png"
        rendered = render_prompt(self.tokenizer, official_messages(self.prompt, [probe], question, self.doc_name))
        with_probe = len(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return with_probe - 3 - self._page_text(probe)  # the probe's start, pad and end tokens and its text

    def item(self, item) -> int:
        if item.kind != "page" or not item.image:
            raise ValueError("MMLongBench's document-QA prompt has only page images")
        return self._page_text(item.image) + item.tokens + 2

    def items(self, items) -> int:
        return sum(self.item(i) for i in items)

    def document(self, doc, role: str):
        key = (doc.doc_id, len(doc.pages), role)
        if key not in self._docs:
            from megatron_vlm.eval.data import ContextItem

            items = [ContextItem.from_page(doc.doc_id, p, role) for p in doc.pages]
            self._docs[key] = (items, self.items(items))
        return self._docs[key]

    def for_example(self, example) -> "OfficialTokenCounter":
        return self.base.for_example(example)


__all__ = ["OfficialDocQAPrompt", "OfficialTokenCounter", "PAGE_SEPARATOR", "official_doc_name", "PROMPT_LOADER", "instance_official_messages", "load_official_docqa_prompt",
           "official_messages", "page_fields", "user_text"]
