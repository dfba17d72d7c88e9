"""MMLongBench's MM-NIAH metrics and the paper's MM-NIAH averages.

Behaviour of MMLongBench v1.1 (``utils.py`` ``calculate_metrics`` and helpers, ``data.py``
``default_post_process``, ``figure_scripts/utils.py`` ``custom_avgs``), re-implemented here:

* The scored output is the prompt's ``system_template`` ("Answer:") followed by the generation
  (``eval.py`` prepends it); each metric is computed on that text and on the *parsed* answer
  (the text after the first "Answer:", a repeated leading "Answer:" removed) and the larger value
  is kept.
* ``sub_em`` (retrieval-text, reasoning-text): some gold answer, normalised (lower case, no
  punctuation, no articles a/an/the, single spaces), is a substring of the normalised output.
  Gold answers: a string, a list of strings, or a list of lists (flattened).
* ``soft_acc`` (counting-text, counting-image): the counts read from the output (the last
  ``[n, n, ...]`` list that parses as JSON; else the last ``[...]`` that parses, items kept where
  ``int()`` works; else every digit run) have the same **sum** as the gold list. MMLongBench
  replaced MM-NIAH's element-wise soft accuracy by this sum test ("for robust evaluation") and
  kept the name; the paper reports MMLongBench's.
* ``mc_acc`` (retrieval-image, reasoning-image): the option letter read from the output ("answer
  is (X)", else "Answer: X", else the last standalone capital A-J) is the gold option index.

The paper (Table 17, Figure 4) averages the text and image variants of each family (retrieval,
counting, reasoning) and reports the macro average of the three families (AVG.), per length, and
over 64K and 128K.

Our prediction records keep the generation stripped of surrounding whitespace; every metric
above is insensitive to that (normalisation or ``\\s*`` in the patterns), see the tests.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Optional, Sequence

FAMILIES = ("retrieval", "counting", "reasoning")
VARIANTS = ("text", "image")
PAPER_FAMILY_NAMES = {"retrieval": "Ret.", "counting": "Count", "reasoning": "Reas."}
ANSWER_PREFIX = "Answer:"  # the NIAH loaders' system_template; replaced by the checkout's at run time
_DATASET = re.compile(r"(?P<family>retrieval|counting|reasoning)-(?P<variant>text|image)$")


def dataset_name(family: str, variant: str) -> str:
    """The official dataset name (``configs/mm_niah_{text,image}_all.yaml``)."""
    return f"mm_niah_{family}-{variant}"


def family_variant(dataset: str) -> Optional[tuple[str, str]]:
    """(family, variant) of an MM-NIAH dataset name, as the official loader reads it from the name."""
    match = _DATASET.search(str(dataset or ""))
    return (match.group("family"), match.group("variant")) if match else None


def metric_of(family: str, variant: str) -> str:
    """The official metric of a task variant (data.py ``load_mm_niah_*``)."""
    if family == "counting":
        return "soft_acc"
    return "sub_em" if variant == "text" else "mc_acc"


# ------------------------------------------------------------------------- normalisation
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles replaced by a space, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_keeping_punctuation(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower()).split())


def parse_answer(output: str, prefix: str = ANSWER_PREFIX) -> str:
    """The answer after the first ``prefix`` (case-insensitive), a repeated leading prefix removed;
    without the prefix, the whole output. Both stripped."""
    match = re.search(f"(?:{prefix})(.*)", output, flags=re.IGNORECASE | re.DOTALL)
    body = (match.group(1) if match else output).strip()
    return re.sub(f"^{re.escape(prefix)}", "", body, flags=re.IGNORECASE).strip()


# ------------------------------------------------------------------------- the three metrics
def _gold_strings(answer: Any) -> list:
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer[0], list):
        return [g for group in answer for g in group]
    return list(answer)


def sub_em(output: str, answer: Any) -> float:
    """1.0 when some normalised gold answer is a substring of the normalised output."""
    pred = normalize_answer(output)
    return float(max(normalize_answer(g) in pred for g in _gold_strings(answer)))


def _ints_where_possible(items: Sequence[Any]) -> list[int]:
    out = []
    for item in items:
        try:
            out.append(int(item))
        except (TypeError, ValueError, OverflowError):
            continue
    return out


def extract_counts(output: str) -> list:
    """The list of counts an output gives (see the module docstring for the three tries)."""
    text = normalize_keeping_punctuation(output)
    numeric_lists = re.findall(r"\[[\d\s,]+\]", text)
    if numeric_lists:
        try:
            return json.loads(numeric_lists[-1])
        except json.JSONDecodeError:
            pass
    bracketed = re.findall(r"\[.*?\]", text, re.DOTALL)
    if bracketed:
        try:
            value = json.loads(bracketed[-1])
            return _ints_where_possible(value if isinstance(value, list) else [value])
        except json.JSONDecodeError:
            pass
    return [int(x) for x in re.findall(r"\d+", text)]


def soft_acc(output: str, answer: Sequence[int]) -> float:
    """1.0 when the counts read from the output sum to the gold counts' sum (MMLongBench's rule)."""
    return float(sum(extract_counts(output)) == sum(answer))


def extract_choice(output: str) -> int:
    """0-based option index of the letter an output names, -1 if none."""
    text = " ".join(output.split())
    for pattern in (r"answer is \(?([A-J])\)?", r"[aA]nswer:\s*([A-J])"):
        match = re.search(pattern, text)
        if match:
            return ord(match.group(1)) - ord("A")
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", text, re.DOTALL)
    return ord(match.group(0)) - ord("A") if match else -1


def mc_acc(output: str, answer: int) -> float:
    return float(extract_choice(output) == answer)


METRICS = {"sub_em": sub_em, "soft_acc": soft_acc, "mc_acc": mc_acc}


def official_score(prediction: str, answer: Any, metric: str, prefix: str = ANSWER_PREFIX) -> tuple[float, str]:
    """(score, parsed answer) of one generation: the metric on ``prefix + prediction`` and on its
    parsed answer, the larger kept (``default_post_process``)."""
    output = prefix + (prediction or "")
    parsed = parse_answer(output, prefix)
    score_fn = METRICS[metric]
    return max(score_fn(output, answer), score_fn(parsed, answer)), parsed


def check_answer(answer: Any, metric: str) -> Optional[str]:
    """Why the official metric cannot score this gold answer (None when it can)."""
    if metric == "sub_em":
        ok = isinstance(answer, str) or (isinstance(answer, list) and answer and (
            all(isinstance(a, str) for a in answer) or
            all(isinstance(a, list) and a and all(isinstance(s, str) for s in a) for a in answer)))
        return None if ok else "sub_em needs a string or a non-empty list of strings"
    if metric == "soft_acc":
        ok = isinstance(answer, list) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in answer)
        return None if ok else "soft_acc needs a list of counts"
    ok = isinstance(answer, int) and not isinstance(answer, bool)
    return None if ok else "mc_acc needs the correct option's 0-based index (an integer)"


def score_record(record: dict, prefix: str = ANSWER_PREFIX):
    """A ``judge.ScoreResult`` for one MM-NIAH prediction record (metric from its dataset name)."""
    from megatron_vlm.eval.judge import ScoreResult

    fv = family_variant(record.get("dataset"))
    if fv is None:
        raise ValueError(f"{record.get('dataset')!r} is not an MM-NIAH dataset name (e.g. mm_niah_counting-image)")
    metric = metric_of(*fv)
    value, parsed = official_score(str(record.get("prediction") or ""), record.get("answer"), metric, prefix)
    scored_by = "empty" if not parsed else f"mmniah-{metric}"
    return ScoreResult(float(value), scored_by, {"metric": metric, "parsed": parsed})


# ------------------------------------------------------------------------- the paper's averages
def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def family_scores(row: dict) -> dict[str, Optional[float]]:
    """Per family, the mean of its text and image variants' scores (those present) in one length's
    ``row`` ({dataset: {"score": ...}}); None where neither was scored."""
    by_family: dict[str, list[float]] = {f: [] for f in FAMILIES}
    for ds, cell in row.items():
        fv = family_variant(ds)
        if fv is not None and cell.get("score") is not None:
            by_family[fv[0]].append(float(cell["score"]))
    return {f: _mean(v) for f, v in by_family.items()}


def length_average(row: dict) -> tuple[Optional[float], bool]:
    """(AVG., complete): the macro average of the family scores; complete when all six variants
    were scored."""
    families = family_scores(row)
    avg = _mean([v for v in families.values() if v is not None])
    present = {family_variant(ds) for ds, c in row.items() if c.get("score") is not None}
    return avg, all((f, v) in present for f in FAMILIES for v in VARIANTS)


def paper_table(table: dict, lengths: Sequence[int], average_lengths: Sequence[int]) -> dict:
    """Table 17 / Figure 4 / Table 21 layout: per length, Ret., Count, Reas., AVG.; then the same
    four averaged over ``average_lengths`` (64K and 128K in the paper). Columns are flattened to
    one header row ("64K Ret.", ..., "128K AVG.", "Ret.", "Count", "Reas.", "AVG."). ``incomplete``
    names, per model, the cells averaged over less than they should be (a variant or length missing)."""
    from megatron_vlm.eval.build import format_length

    labels = [format_length(n) for n in lengths]
    over = [format_length(n) for n in average_lengths if n in lengths]
    names = [PAPER_FAMILY_NAMES[f] for f in FAMILIES] + ["AVG."]
    columns = [f"{lab} {name}" for lab in labels for name in names] + (names if over else [])
    rows, incomplete = {}, {}
    for model, data in table.items():
        row: dict = {}
        partial: set[str] = set()
        for lab in labels:
            cells = data["lengths"].get(lab, {"datasets": {}})["datasets"]
            present = {family_variant(ds) for ds, c in cells.items() if c.get("score") is not None}
            families = family_scores(cells)
            for f in FAMILIES:
                row[f"{lab} {PAPER_FAMILY_NAMES[f]}"] = families[f]
                if families[f] is not None and any((f, v) not in present for v in VARIANTS):
                    partial.add(f"{lab} {PAPER_FAMILY_NAMES[f]}")
            avg, complete = length_average(cells)
            row[f"{lab} AVG."] = avg
            if avg is not None and not complete:
                partial.add(f"{lab} AVG.")
        for name in names if over else ():
            values = [row[f"{lab} {name}"] for lab in over]
            row[name] = _mean([v for v in values if v is not None])
            if row[name] is not None and (None in values or any(f"{lab} {name}" in partial for lab in over)):
                partial.add(name)
        rows[model] = row
        if partial:
            incomplete[model] = [c for c in columns if c in partial]
    return {"table": "MM-NIAH (Table 17 / Figure 4)", "lengths": labels, "average_over": over,
            "datasets": [dataset_name(f, v) for f in FAMILIES for v in VARIANTS], "columns": columns,
            "rows": rows, "incomplete": incomplete}


__all__ = ["ANSWER_PREFIX", "FAMILIES", "METRICS", "PAPER_FAMILY_NAMES", "VARIANTS", "check_answer",
           "dataset_name", "extract_choice", "extract_counts", "family_scores", "family_variant",
           "length_average", "mc_acc", "metric_of", "normalize_answer", "official_score", "paper_table",
           "parse_answer", "score_record", "soft_acc", "sub_em"]
