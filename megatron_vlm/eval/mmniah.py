"""MMLongBench's standardised MM-NIAH (``--data mmlb-niah:NIAH_DIR,images=IMAGE_DIR``): the files,
the official record choice, the official prompt, one instance per record and length.

Files (MMLongBench ``configs/mm_niah_{text,image}_all.yaml``): ``NIAH/<family>-<variant>_test_K<k>
_dep<d>.jsonl`` with family retrieval / counting / reasoning, variant text / image, k in 8, 16, 32,
64, 128 (thousand tokens, binary). Where a folder holds several ``dep`` files of one task and
length, the config's choice is used (:data:`OFFICIAL_DEP`). Each file is one dataset
(``mm_niah_<family>-<variant>``, the official name) at one length; nothing is built at other
lengths.

Records (``data.py`` ``load_mm_niah_text`` / ``load_mm_niah_image_count`` /
``load_mm_niah_image_mc``): ``id``, ``ctxs`` (paragraphs ``{"text": ...}``, joined by blank lines
into the context, which holds one ``<image>`` per entry of ``image_list``), ``image_list`` (paths
under the image root), ``question``, ``answer``; counting-image adds ``needle_image_list`` (its
question holds their ``<image>``); retrieval-image and reasoning-image add ``choices_image`` (the
question gets a line ``X. <image>`` per option, X = A, B, ...) and answer with the option index.
The images of a prompt are ``image_list`` then the needle or option images, one per ``<image>``
of the filled template, in order. ``depth`` (where present) goes to the report's by-depth table,
rounded up to tenths as MMLongBench's depth heatmap bins it.

Choice (``data.py``, after ``eval.py`` ``set_seed(args.seed)`` before each file): the file's
distinct ids, sorted, and ``random.sample`` of ``min(max_test_samples, count)`` of them with
Python's ``random`` seeded 42; every record whose id was drawn is kept, in file order.
``max_test_samples`` is 50 in the NIAH configs (``--max-test-samples``; ``all`` keeps every
record).

Prompt: ``user_template`` (``{context}``, ``{question}``) and ``system_template`` ("Answer:",
pre-filled as the assistant turn) of the loader for the variant, read at run time from the user's
MMLongBench checkout (``--mmlb-dir``) with :mod:`ast`, never imported or run. MM-NIAH has only
this prompt (``--prompt-format`` does not apply). Scores: :mod:`megatron_vlm.eval.mmniah_metrics`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from megatron_vlm.common.jsonl import iter_jsonl_lines
from megatron_vlm.eval.data import (ContextItem, DataConfig, DataError, DataSpec, Dropped, EvalExample, EvalSet,
                                    _check_options, image_root_option, page_tokens)
from megatron_vlm.eval.mmniah_metrics import FAMILIES, VARIANTS, check_answer, dataset_name, metric_of

KIND = "mmlb-niah"
TASK = "mmniah"
MMNIAH_MAX_TEST_SAMPLES = 50  # configs/mm_niah_{text,image}_all.yaml: max_test_samples
MMNIAH_SEED = 42  # arguments.py --seed default; eval.py set_seed() before every file
# configs/mm_niah_*_all.yaml: the dep<d> file each task is evaluated on
OFFICIAL_DEP = {("retrieval", "text"): 6, ("counting", "text"): 3, ("reasoning", "text"): 3,
                ("retrieval", "image"): 6, ("counting", "image"): 3, ("reasoning", "image"): 6}
IMAGE_TOKEN = "<image>"
_FILE = re.compile(r"^(?P<family>retrieval|counting|reasoning)-(?P<variant>text|image)_test_K(?P<k>\d+)"
                   r"(?:_dep(?P<dep>\d+))?\.jsonl$")


def loader_of(family: str, variant: str) -> str:
    """The data.py function that prompts this variant (its templates are the model's prompt)."""
    if variant == "text":
        return "load_mm_niah_text"
    return "load_mm_niah_image_count" if family == "counting" else "load_mm_niah_image_mc"


def official_niah_selection(ids: Sequence[Any], max_test_samples: Optional[int], seed: int = MMNIAH_SEED) -> set:
    """The ids the official loader keeps from one file: ``random.sample(sorted(set(ids)), k)`` with
    ``random`` seeded ``seed`` (``set_seed`` seeds it right before the file is loaded)."""
    keys = sorted(set(ids))
    if max_test_samples is None:
        return set(keys)
    return set(random.Random(seed).sample(keys, min(max_test_samples, len(keys))))


# ------------------------------------------------------------------------- files
def niah_files(path: str) -> dict[tuple[str, str], dict[int, str]]:
    """(family, variant) -> length in tokens -> file, from a folder (or one file)."""
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.jsonl")))
    found: dict[tuple[str, str, int], dict[Optional[int], str]] = {}
    for f in files:
        match = _FILE.match(os.path.basename(f))
        if not match:
            if os.path.isfile(path):
                raise DataError(f"{f}: not an MM-NIAH file name (<retrieval|counting|reasoning>-<text|image>"
                                "_test_K<k>[_dep<d>].jsonl, e.g. counting-image_test_K64_dep3.jsonl)")
            continue
        key = (match.group("family"), match.group("variant"), int(match.group("k")) * 1024)
        dep = int(match.group("dep")) if match.group("dep") else None
        found.setdefault(key, {})[dep] = f
    if not found:
        raise DataError(f"no MM-NIAH files at {path} (expected MMLongBench's NIAH folder with e.g. "
                        "retrieval-text_test_K64_dep6.jsonl)")
    out: dict[tuple[str, str], dict[int, str]] = {}
    for (family, variant, length), by_dep in sorted(found.items()):
        official = OFFICIAL_DEP[(family, variant)]
        if official in by_dep:
            chosen = by_dep[official]
        elif len(by_dep) == 1:
            chosen = next(iter(by_dep.values()))
        else:
            raise DataError(f"{path}: several {family}-{variant} files at K{length // 1024} "
                            f"({sorted(os.path.basename(p) for p in by_dep.values())}) and none is the "
                            f"official dep{official}; keep one")
        out.setdefault((family, variant), {})[length] = chosen
    return out


# ------------------------------------------------------------------------- records
def read_mmniah(spec: DataSpec, cfg: DataConfig) -> list[EvalSet]:
    _check_options(spec, ("images",))
    image_root = image_root_option(spec, KIND,
                                   "the folder that image_list paths are relative to, MMLongBench's image root")
    grouped = niah_files(spec.path)
    sets = []
    for family in FAMILIES:
        for variant in VARIANTS:
            if (family, variant) in grouped:
                sets.append(_read_variant(family, variant, grouped[(family, variant)], image_root, cfg))
    return sets


def _read_variant(family: str, variant: str, by_length: dict[int, str], image_root: str,
                  cfg: DataConfig) -> EvalSet:
    name = dataset_name(family, variant)
    out = EvalSet(name, [], info={"kind": TASK, "family": family, "variant": variant,
                                  "metric": metric_of(family, variant),
                                  "files": {str(k): v for k, v in sorted(by_length.items())}})
    limit = cfg.mmniah_max_test_samples
    for length, path in sorted(by_length.items()):
        lines = list(iter_jsonl_lines(path))
        ids = [rec["id"] for _, _, rec in lines if isinstance(rec, dict) and "id" in rec]
        try:
            chosen = official_niah_selection(ids, limit, cfg.selection_seed)
        except TypeError:
            raise DataError(f"{path}: the record ids mix types (numbers and strings); the official loader "
                            "sorts them and would fail too") from None
        seen: Counter = Counter()
        kept = 0
        for _number, where, rec in lines:
            if isinstance(rec, json.JSONDecodeError):
                out.dropped.append(Dropped(name, where, "bad_record", f"not valid JSON ({rec.msg})"))
                continue
            if not isinstance(rec, dict) or "id" not in rec:
                out.dropped.append(Dropped(name, where, "bad_record", "not a JSON object with an 'id'"))
                continue
            try:
                hash(rec["id"])
            except TypeError:
                out.dropped.append(Dropped(name, where, "bad_record", f"id {rec['id']!r} is not a string or number"))
                continue
            if rec["id"] not in chosen:
                continue
            kept += 1
            seen[rec["id"]] += 1
            suffix = "" if seen[rec["id"]] == 1 else f"#{seen[rec['id']]}"
            try:
                out.examples.append(_example(rec, f"{rec['id']}{suffix}", name, family, variant, length,
                                             image_root, cfg, where))
            except DataError as err:
                out.dropped.append(Dropped(name, where, err.reason, str(err)))
        if kept < len(lines):
            out.info.setdefault("selected", {})[str(length)] = f"{kept} of {len(lines)}"
    return out


def _strings(rec: dict, key: str, where: str) -> list[str]:
    value = rec.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: '{key}' must be a list of image paths", "bad_record")
    return value


def _example(rec: dict, example_id: str, name: str, family: str, variant: str, length: int, image_root: str,
             cfg: DataConfig, where: str) -> EvalExample:
    ctxs = rec.get("ctxs")
    if not isinstance(ctxs, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in ctxs):
        raise DataError(f"{where}: 'ctxs' must be a list of {{\"text\": ...}} paragraphs", "bad_record")
    if not isinstance(rec.get("question"), str) or "answer" not in rec:
        raise DataError(f"{where}: needs a string 'question' and an 'answer'", "bad_record")
    metric = metric_of(family, variant)
    problem = check_answer(rec["answer"], metric)
    if problem:
        raise DataError(f"{where}: answer {rec['answer']!r}: {problem}", "bad_answer")
    context = "\n\n".join(p["text"] for p in ctxs)
    question = rec["question"]
    images = _strings(rec, "image_list", where)
    extra_key = None if variant == "text" else ("needle_image_list" if family == "counting" else "choices_image")
    extra = _strings(rec, extra_key, where) if extra_key else []
    if extra_key == "choices_image":
        question += "".join(f"\n{chr(ord('A') + i)}. {IMAGE_TOKEN}" for i in range(len(extra)))
    slots = context.count(IMAGE_TOKEN) + question.count(IMAGE_TOKEN)
    if slots != len(images) + len(extra):
        raise DataError(f"{where}: the context and question hold {slots} {IMAGE_TOKEN} placeholder(s) for "
                        f"{len(images) + len(extra)} image(s) (the official run stops on this record)",
                        "image_count_mismatch")
    items = [ContextItem("text", text=context, role="haystack")]
    for paths, role in ((images, "haystack"), (extra, "needle" if family == "counting" else "option")):
        for rel in paths:
            full = os.path.join(image_root, rel)
            if not os.path.isfile(full):
                raise DataError(f"{where}: image {full} does not exist", "missing_image")
            items.append(ContextItem("image", image=os.path.abspath(full), tokens=page_tokens(full, cfg), role=role))
    fmt = {"sub_em": "String", "soft_acc": "List", "mc_acc": "Integer"}[metric]
    meta = {"family": family, "variant": variant, "metric": metric, "mmniah_id": rec["id"]}
    if isinstance(rec.get("depth"), (int, float)) and not isinstance(rec.get("depth"), bool):
        # binned as MMLongBench's depth heatmap does (figure_scripts/9_heatmap_by_depth.py), float quirks included
        meta["depth"] = math.ceil(rec["depth"] * 10) / 10
        meta["depth_exact"] = rec["depth"]
    return EvalExample(id=example_id, dataset=name, question=question, answer=rec["answer"], answer_format=fmt,
                       task=TASK, published={length: items}, meta=meta)


# ------------------------------------------------------------------------- instances
def instance_at(example: EvalExample, length: int, counter, seed: int):
    """The record's published context at ``length`` (MM-NIAH builds nothing). ``num_tokens``:
    context and question text tokens plus image tokens (+2 each), without the template."""
    from megatron_vlm.eval.build import Instance

    items = example.published.get(length)
    if items is None:
        return Dropped(example.dataset, example.id, "no_file_at_length",
                       "MM-NIAH is evaluated only at the lengths of its files")
    text = "".join(i.text or "" for i in items if i.kind == "text").replace(IMAGE_TOKEN, "")
    text_tokens = len(counter.tokenizer(text + example.question.replace(IMAGE_TOKEN, ""),
                                        add_special_tokens=False)["input_ids"])
    total = text_tokens + sum(i.tokens + 2 for i in items if i.image)
    return Instance(example.dataset, example.id, length, example.task, example.question, example.answer,
                    example.answer_format, None, [], list(items), total, "published", seed, meta=dict(example.meta))


# ------------------------------------------------------------------------- the official prompt
@dataclass(frozen=True)
class OfficialNIAHPrompts:
    templates: dict  # data.py loader -> (user_template, system_template)
    source: str
    digest: str  # SHA-256 of the texts (part of the predictions' fingerprint)


def load_official_niah_prompts(checkout: str) -> OfficialNIAHPrompts:
    """The MM-NIAH prompts of an MMLongBench checkout's ``data.py`` (read with ast)."""
    from megatron_vlm.eval.mmlb_judge import DATA_FILE, PromptFileError, checkout_folder, format_fields
    from megatron_vlm.eval.mmlb_prompt import _function_strings
    from megatron_vlm.eval.mmniah_metrics import ANSWER_PREFIX

    checkout = checkout_folder(checkout, DATA_FILE, "--mmlb-dir ")
    path = os.path.join(checkout, DATA_FILE)
    templates = {}
    for function in sorted({loader_of(f, v) for f in FAMILIES for v in VARIANTS}):
        strings = _function_strings(path, function)
        missing = [n for n in ("user_template", "system_template") if n not in strings]
        if missing:
            raise PromptFileError(f"{path}: {function}() assigns no string {missing} (MMLongBench's MM-NIAH loader)")
        user, system = strings["user_template"], strings["system_template"]
        if format_fields(user) != {"context", "question"} or IMAGE_TOKEN in user:
            raise PromptFileError(f"{path}: {function}() user_template has fields {sorted(format_fields(user))}; "
                                  "expected {context} and {question} and no <image>")
        if system != ANSWER_PREFIX:
            raise PromptFileError(f"{path}: {function}() system_template is {system!r}; expected {ANSWER_PREFIX!r}, "
                                  "which the official scoring puts before every output")
        templates[function] = (user, system)
    digest = hashlib.sha256(json.dumps(sorted(templates.items())).encode("utf-8")).hexdigest()
    return OfficialNIAHPrompts(templates, os.path.abspath(checkout), digest)


def niah_messages(prompts: Optional[OfficialNIAHPrompts], instance) -> list[dict[str, Any]]:
    """The official chat of one instance: the filled user template cut at every ``<image>`` (images
    in order: context images, then needle or option images; empty text pieces left out), then the
    pre-filled assistant turn."""
    if prompts is None:
        raise ValueError(f"{instance.dataset}: MM-NIAH is prompted as MMLongBench does, with the templates of "
                         "your MMLongBench checkout: give --mmlb-dir DIR "
                         "(git clone https://github.com/EdinburghNLP/MMLongBench)")
    user, system = prompts.templates[loader_of(instance.meta["family"], instance.meta["variant"])]
    context = "".join(i.text or "" for i in instance.items if i.kind == "text")
    images = [i.image for i in instance.items if i.image]
    content: list[dict[str, Any]] = []
    pieces = re.split(f"({re.escape(IMAGE_TOKEN)})", user.format(context=context, question=instance.question))
    remaining = list(images)
    for piece in pieces:
        if piece == IMAGE_TOKEN:
            if not remaining:
                raise ValueError(f"{instance.key}: more {IMAGE_TOKEN} placeholders than images")
            content.append({"type": "image", "image": remaining.pop(0)})
        elif piece:
            content.append({"type": "text", "text": piece})
    if remaining:
        raise ValueError(f"{instance.key}: {len(remaining)} image(s) have no {IMAGE_TOKEN} placeholder")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": system}]


__all__ = ["KIND", "MMNIAH_MAX_TEST_SAMPLES", "OFFICIAL_DEP", "OfficialNIAHPrompts", "TASK", "instance_at",
           "load_official_niah_prompts", "loader_of", "niah_files", "niah_messages", "official_niah_selection",
           "read_mmniah"]
