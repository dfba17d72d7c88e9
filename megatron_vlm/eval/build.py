"""Length instantiation: one example -> the context it is asked in at a token budget.

* A published instance for exactly this length (MMLongBench files) is used as it is.
* Otherwise the base is the longest published instance below the budget, or the gold document.
* **Trim** (base over budget): keep the evidence pages and grow a contiguous window around them,
  one page at a time on alternate sides (first side seeded), while it fits. Unanswerable
  questions (no evidence) centre the window on a seeded random page.
* **Extend** (base under budget): alternately add whole, randomly chosen negative documents on the
  left and on the right (left first) until no remaining document fits in the budget.
* **Needle in a haystack**: whole shuffled pool documents (the last one cut at a page) fill the
  budget, and the needle goes in at the page border nearest its depth (fraction of the tokens).

Token count = sum over pages of (page tokens + 2 for vision start/end) + every text token of the
prompt the example is really sent with (template, instruction, labels, question, "Answer:"): ours
(``prompt.TokenCounter``) or MMLongBench's own (``mmlb_prompt.OfficialTokenCounter``).
Randomness comes from one seed per (run seed, dataset, example, length), so a rerun, or any
subset of examples, gets the same contexts. Every instance records what was added or cut.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from megatron_vlm.eval.data import ContextItem, Document, Dropped, EvalExample
from megatron_vlm.eval.prompt import TokenCounter


@dataclass
class Instance:
    """An example at one length: the context items in prompt order and how they were chosen."""

    dataset: str
    example_id: str
    length: int  # the budget, in tokens
    task: str
    question: str
    answer: Any
    answer_format: str
    gold_doc_id: Optional[str]
    evidence_pages: list[int]
    items: list[ContextItem]
    num_tokens: int
    method: str  # published | whole | trimmed | extended | published+extended | niah
    seed: int
    added: list[dict] = field(default_factory=list)  # negatives: doc_id, side, pages, tokens (in order)
    kept_pages: list[int] = field(default_factory=list)  # gold pages in the context
    notes: list[str] = field(default_factory=list)  # under budget because ..., evidence missing, ...
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.length}|{self.example_id}"

    @property
    def num_images(self) -> int:
        return sum(1 for i in self.items if i.image)

    def summary(self) -> dict:
        """What a prediction record keeps about its context (no per-page list)."""
        docs: list[dict] = []
        for item in self.items:
            if item.kind != "page":
                docs.append({"needle": item.kind})
            elif docs and docs[-1].get("doc_id") == item.doc_id:
                docs[-1]["pages"] += 1
            else:
                docs.append({"doc_id": item.doc_id, "role": item.role, "pages": 1})
        return {"num_tokens": self.num_tokens, "num_images": self.num_images, "method": self.method,
                "seed": self.seed, "documents": docs, "added": self.added, "kept_pages": self.kept_pages,
                "notes": self.notes}

    def to_dict(self) -> dict:
        """The whole instance (written to ``instances/``, enough to rebuild the prompt)."""
        return {"key": self.key, "dataset": self.dataset, "id": self.example_id, "length": self.length,
                "task": self.task, "question": self.question, "answer": self.answer,
                "answer_format": self.answer_format, "gold_doc_id": self.gold_doc_id,
                "evidence_pages": self.evidence_pages, **self.summary(),
                "items": [i.to_dict() for i in self.items], "meta": self.meta}


# ------------------------------------------------------------------------- lengths and seeds
def parse_length(text: str) -> int:
    """``8K`` -> 8192, ``1M`` -> 1048576 (binary prefixes, as in the paper), ``3000`` -> 3000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"length {text!r}: expected a number with an optional K or M suffix (8K, 128K, 1M)")
    value = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[match.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"length {text!r} is not a whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    lengths = [parse_length(part) for part in text.split(",") if part.strip()]
    if not lengths:
        raise ValueError("no lengths given (e.g. --lengths 8K,16K,32K)")
    return sorted(set(lengths))


def format_length(tokens: int) -> str:
    if tokens % (1024 ** 2) == 0:
        return f"{tokens // 1024 ** 2}M"
    if tokens % 1024 == 0:
        return f"{tokens // 1024}K"
    return str(tokens)


def example_seed(seed: int, dataset: str, example_id: str, length: int) -> int:
    digest = hashlib.sha256(f"{seed}|{dataset}|{example_id}|{length}".encode()).hexdigest()
    return int(digest[:16], 16)


# ------------------------------------------------------------------------- instantiation
def instantiate(example: EvalExample, length: int, negatives: Sequence[Document], counter: TokenCounter,
                seed: int = 0, use_published: bool = True) -> Union[Instance, Dropped]:
    """The example's context at ``length`` tokens, or a Dropped saying why it cannot fit."""
    ex_seed = example_seed(seed, example.dataset, example.id, length)
    if example.task == "mmniah":  # MMLongBench's MM-NIAH: the published context as it is
        from megatron_vlm.eval.mmniah import instance_at
        return instance_at(example, length, counter, ex_seed)
    rng = random.Random(ex_seed)
    gold_id = example.doc.doc_id if example.doc is not None else None
    counter = counter.for_example(example)  # the prompt this example is really sent with
    fixed = counter.fixed(example.task, example.question, gold_id)
    if example.task == "niah":
        return _instantiate_niah(example, length, negatives, counter, fixed, rng, ex_seed)
    base_length = max((k for k in example.published if k <= length), default=None) if use_published else None
    if base_length == length:
        items = list(example.published[length])
        total = fixed + counter.items(items)
        inst = _instance(example, length, items, total, "published", ex_seed)
        if total > length:
            inst.notes.append(f"the published instance has {total} tokens by our count, over the {length} budget")
        return inst
    if base_length is not None and fixed + counter.items(example.published[base_length]) <= length:
        items, method = list(example.published[base_length]), "published+extended"
    else:  # no published base (or one our count puts over the budget): start from the gold document
        if example.doc is None or not example.doc.pages:
            return Dropped(example.dataset, example.id, "no_document", "the example has no gold document pages")
        items = [ContextItem.from_page(example.doc.doc_id, p, "gold") for p in example.doc.pages]
        method = "extended"
        if fixed + counter.items(items) > length:
            return _trim(example, length, counter, fixed, rng, ex_seed)
    return _extend(example, length, items, method, negatives, counter, fixed, rng, ex_seed)


def _instance(example: EvalExample, length: int, items: list[ContextItem], total: int, method: str,
              seed: int) -> Instance:
    gold_id = example.doc.doc_id if example.doc is not None else None
    kept = [i.page for i in items if i.kind == "page" and i.role == "gold"]
    inst = Instance(example.dataset, example.id, length, example.task, example.question, example.answer,
                    example.answer_format, gold_id, list(example.evidence_pages), items, total, method, seed,
                    kept_pages=kept, meta=dict(example.meta))
    missing = [p for p in example.evidence_pages if p not in set(kept)]
    if missing and example.task == "docqa":
        inst.notes.append(f"evidence page(s) {missing} not in the context")
    return inst


def _trim(example: EvalExample, length: int, counter: TokenCounter, fixed: int, rng: random.Random,
          seed: int) -> Union[Instance, Dropped]:
    assert example.doc is not None
    pages = example.doc.pages
    costs = [counter.item(ContextItem.from_page(example.doc.doc_id, p, "gold")) for p in pages]
    room = length - fixed
    index_of = {p.page: i for i, p in enumerate(pages)}
    evidence = sorted(index_of[p] for p in example.evidence_pages if p in index_of)
    if evidence:
        span = list(range(evidence[0], evidence[-1] + 1))
        chosen = span if sum(costs[i] for i in span) <= room else evidence
    else:
        chosen = [rng.randrange(len(pages))]
    used = sum(costs[i] for i in chosen)
    if used > room:
        return Dropped(example.dataset, example.id, "evidence_over_budget",
                       f"the {len(chosen)} evidence page(s) alone need {used + fixed} tokens, more than {length}")
    lo, hi = min(chosen), max(chosen)
    selected = set(chosen)
    open_sides = {"left": True, "right": True}
    side = rng.choice(("left", "right"))
    while any(open_sides.values()):
        if not open_sides[side]:
            side = "right" if side == "left" else "left"
            continue
        nxt = lo - 1 if side == "left" else hi + 1
        if 0 <= nxt < len(pages) and used + costs[nxt] <= room:
            selected.add(nxt)
            used += costs[nxt]
            lo, hi = min(lo, nxt), max(hi, nxt)
        else:
            open_sides[side] = False
        side = "right" if side == "left" else "left"
    items = [ContextItem.from_page(example.doc.doc_id, pages[i], "gold") for i in sorted(selected)]
    inst = _instance(example, length, items, fixed + used, "trimmed", seed)
    if len(selected) < hi - lo + 1:
        inst.notes.append("the evidence span does not fit: only the evidence pages and their neighbours are kept")
    return inst


def _extend(example: EvalExample, length: int, items: list[ContextItem], method: str,
            negatives: Sequence[Document], counter: TokenCounter, fixed: int, rng: random.Random,
            seed: int) -> Instance:
    used_docs = {i.doc_id for i in items if i.kind == "page"}
    candidates = [d for d in negatives if d.doc_id not in used_docs and d.pages]
    candidates.sort(key=lambda d: d.doc_id)
    rng.shuffle(candidates)
    total = fixed + counter.items(items)
    left: list[list[ContextItem]] = []
    right: list[list[ContextItem]] = []
    added: list[dict] = []
    side = "left"
    while candidates:
        pick = None
        for index, doc in enumerate(candidates):  # the next random document that still fits
            doc_items, cost = counter.document(doc, "negative")
            if total + cost <= length:
                pick = index
                break
        if pick is None:
            break
        doc = candidates.pop(pick)
        total += cost
        (left if side == "left" else right).append(doc_items)
        added.append({"doc_id": doc.doc_id, "side": side, "pages": len(doc.pages), "tokens": cost})
        side = "right" if side == "left" else "left"
    context = [i for block in reversed(left) for i in block] + list(items) + [i for block in right for i in block]
    inst = _instance(example, length, context, total, method if added else ("whole" if method == "extended"
                                                                            else "published"), seed)
    inst.added = added
    if not negatives:
        inst.notes.append("no negative documents to extend with")
    elif length - total > 0.25 * length:
        inst.notes.append(f"under budget: {total} of {length} tokens (no remaining negative document fits)")
    return inst


def _instantiate_niah(example: EvalExample, length: int, haystack: Sequence[Document], counter: TokenCounter,
                      fixed: int, rng: random.Random, seed: int) -> Union[Instance, Dropped]:
    assert example.needle is not None
    needle = example.needle.item()
    needle_cost = counter.item(needle)
    room = length - fixed - needle_cost
    if room < 0:
        return Dropped(example.dataset, example.id, "over_budget", f"the question and needle alone exceed {length}")
    docs = sorted(haystack, key=lambda d: d.doc_id)
    rng.shuffle(docs)
    items: list[ContextItem] = []
    costs: list[int] = []
    used, full = 0, False
    for doc in docs:
        for page in doc.pages:
            item = ContextItem.from_page(doc.doc_id, page, "negative")
            cost = counter.item(item)
            if used + cost > room:
                full = True
                break
            items.append(item)
            costs.append(cost)
            used += cost
        if full:
            break
    # the page border whose share of the haystack tokens is nearest the depth
    target, running, position = example.needle.depth * used, 0, 0
    best = abs(target)
    for index, cost in enumerate(costs, 1):
        running += cost
        if abs(running - target) < best:
            best, position = abs(running - target), index
    items.insert(position, needle)
    inst = _instance(example, length, items, fixed + used + needle_cost, "niah", seed)
    inst.meta.update(needle_position=position, needle_token_offset=sum(costs[:position]),
                     haystack_tokens=used)
    if not full:
        inst.notes.append(f"under budget: the pool has only {used + fixed + needle_cost} tokens of pages")
    return inst


__all__ = ["Instance", "example_seed", "format_length", "instantiate", "parse_length", "parse_lengths"]
