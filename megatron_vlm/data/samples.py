"""The training-sample JSONL format shared by synthesis, mixing, preprocessing and evaluation.

One JSON object per line::

    {"id": "f4dc...:extract-single:0",
     "task": "extract-single",            # extract-single | extract-multi | reasoning | ocr-full |
                                          # ocr-needle | short (LLaVA-style short data) | eval
     "image_root": "/data/pool",          # optional: relative image paths resolve against it
     "images": ["images/f4/f4dc.../0001.jpg", ...],   # in the order the messages use them
     "image_tokens": [2508, ...],         # optional: Qwen2.5-VL tokens per image (pool's count)
     "messages": [
        {"role": "system", "content": "..."},                       # optional
        {"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": "Question ..."}]},
        {"role": "assistant", "content": "Answer ..."}],          # the supervised turn(s)
     "meta": {"doc_id": ..., "answer": ..., "answer_format": "String|Integer|Float|List|None",
              "evidence_pages": [12], "evidence_sources": [...], "num_pages": 40, "num_tokens": 101234,
              ...}}

``{"type": "image"}`` items consume ``images`` in order; their count must equal ``len(images)``.
Loss is taken on assistant turns only. Readers name the file and line of every bad record.

Records are checked by type before any stage uses them (nothing is coerced): ``id`` a non-empty
string, ``task`` one of ``TASKS``, ``images`` non-empty strings, ``image_tokens`` non-negative
integers (one per image), ``image_root`` a string, ``meta`` an object. With an ``image_root``,
every image must lie inside it once ``..`` and symbolic links are resolved (absolute paths too):
a record that points elsewhere is refused (reason ``image_outside_root``), never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from megatron_vlm.common.jsonl import iter_jsonl_lines

TASKS = ("extract-single", "extract-multi", "reasoning", "ocr-full", "ocr-needle", "short", "eval")
ROLES = ("system", "user", "assistant")
ANSWER_FORMATS = ("String", "Integer", "Float", "List", "None")


class SampleError(ValueError):
    """A record that does not follow the format; the message names where and what, ``reason`` is a
    short code for reports (``bad_record``, ``image_outside_root``)."""

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def inside_root(root: str, path: str) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


@dataclass
class Sample:
    id: str
    task: str
    images: list[str]
    messages: list[dict[str, Any]]
    image_root: Optional[str] = None
    image_tokens: Optional[list[int]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def image_paths(self) -> list[str]:
        """Absolute (or as-given) paths of the images, in message order."""
        if not self.image_root:
            return list(self.images)
        return [p if os.path.isabs(p) else os.path.join(self.image_root, p) for p in self.images]

    def num_image_slots(self) -> int:
        return sum(1 for m in self.messages if isinstance(m["content"], list)
                   for item in m["content"] if item.get("type") == "image")

    def to_json(self) -> str:
        record: dict[str, Any] = {"id": self.id, "task": self.task}
        if self.image_root:
            record["image_root"] = self.image_root
        record["images"] = self.images
        if self.image_tokens is not None:
            record["image_tokens"] = self.image_tokens
        record["messages"] = self.messages
        record["meta"] = self.meta
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_dict(cls, record: Any, where: str = "record") -> "Sample":
        if not isinstance(record, dict):
            raise SampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("id", "task", "images", "messages") if k not in record]
        if missing:
            raise SampleError(f"{where}: missing field(s) {missing}")
        if not isinstance(record["id"], str) or not record["id"]:
            raise SampleError(f"{where}: 'id' must be a non-empty string, got {type(record['id']).__name__} "
                              f"{record['id']!r:.60}")
        if not isinstance(record["task"], str) or record["task"] not in TASKS:
            raise SampleError(f"{where}: task {record['task']!r:.60} is not one of {TASKS}")
        images, messages = record["images"], record["messages"]
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise SampleError(f"{where}: 'images' must be a list of paths (non-empty strings)")
        image_root = record.get("image_root")
        if image_root is not None and not isinstance(image_root, str):
            raise SampleError(f"{where}: 'image_root' must be a string (a folder), got {type(image_root).__name__}")
        meta = record.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise SampleError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
        if not isinstance(messages, list) or not messages:
            raise SampleError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
                raise SampleError(f"{where}: message {i} needs a role in {ROLES} and a content")
            content = m["content"]
            if isinstance(content, list):
                for item in content:
                    if not isinstance(item, dict) or item.get("type") not in ("image", "text"):
                        raise SampleError(f"{where}: message {i} has a content item that is not "
                                          "{'type': 'image'} or {'type': 'text', 'text': ...}")
                    if item["type"] == "text" and not isinstance(item.get("text"), str):
                        raise SampleError(f"{where}: message {i} has a text item without a string 'text'")
            elif not isinstance(content, str):
                raise SampleError(f"{where}: message {i} content must be a string or a list")
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError(f"{where}: no assistant turn, so nothing to learn from")
        tokens = record.get("image_tokens")
        if tokens is not None and (not isinstance(tokens, list) or len(tokens) != len(images)):
            raise SampleError(f"{where}: 'image_tokens' must list one count per image")
        if tokens is not None and not all(_is_int(t) and t >= 0 for t in tokens):
            bad = next(t for t in tokens if not (_is_int(t) and t >= 0))
            raise SampleError(f"{where}: 'image_tokens' must be non-negative integers, got "
                              f"{type(bad).__name__} {bad!r:.40}")
        if image_root:
            for path in images:
                if not inside_root(image_root, path):
                    raise SampleError(f"{where}: image {path!r:.200} lies outside its image_root {image_root} "
                                      "(after resolving '..' and links); not read", "image_outside_root")
        sample = cls(id=record["id"], task=record["task"], images=images, messages=messages,
                     image_root=image_root, image_tokens=tokens, meta=meta or {})
        slots = sample.num_image_slots()
        if slots != len(images):
            raise SampleError(f"{where}: messages have {slots} image slots but 'images' lists {len(images)}")
        return sample


def read_samples(path: str) -> Iterator[tuple[int, Sample | SampleError]]:
    """(line number, sample or the error for that line) for every non-empty line; never stops early,
    so callers can count and report every bad line."""
    for number, where, record in iter_jsonl_lines(path):
        if isinstance(record, json.JSONDecodeError):
            yield number, SampleError(f"{where}: not valid JSON ({record.msg} at column {record.colno})")
            continue
        try:
            yield number, Sample.from_dict(record, where)
        except SampleError as err:
            yield number, err
