"""Line-by-line JSONL reading that never stops at a bad line, so callers can report every one."""

from __future__ import annotations

import json
from typing import Any, Iterator, Union


def iter_jsonl_lines(path: str) -> Iterator[tuple[int, str, Union[Any, json.JSONDecodeError]]]:
    """(line number, "path:line", parsed value or its JSONDecodeError) for each non-empty line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                yield number, f"{path}:{number}", err
