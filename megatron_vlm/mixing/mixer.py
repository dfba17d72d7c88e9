"""Build a training mixture from task JSONL files: task ratios, length distribution, short-data share,
token budget; statistics like the paper's Tables 10-11 and a token-length histogram.

The recipe (MMProLong, Appendix A): 40% extract-single, 40% extract-multi, 20% reasoning, the
*pool-native* length distribution (samples as the pool gives them), no short data, 5B tokens.
Shares are shares of **tokens** (the budget is a token budget): each task gets
``budget x (1 - short_ratio) x task share``, divided among the input files that hold the task in
proportion to their ``FILE:WEIGHT`` weights; short-context data gets ``budget x short_ratio``.
Without ``--task-mix`` (``none``) the file weights alone set the shares.

*Long-biased* (Section 5.1) draws samples of >= 100K tokens with probability ``long_fraction``
(the paper's variant has 83.9% of samples >= 100K against 23.6% pool-native) until the budget is
spent. It can only reweight what the inputs hold: the paper built its variant from 50-100-page
documents, so feed it long samples.

Counts use binary prefixes as the paper does: K = 2^10, M = 2^20, B = 2^30 tokens. Lengths are
exact: each sample is rendered with the chat template and tokenized, images counted by
``image_token_count`` (from ``image_tokens`` when the record has them, else from the file header).

Short-context data may be LLaVA conversation JSONL (``{"image": path, "conversations": [{"from":
"human"|"gpt", "value": "<image>\\n..."}]}``); it is converted into ``Sample``s of task ``short``.
Nothing is dropped silently: bad lines, missing images, tasks outside the mix, over-long samples
and the unused part of every pool are in the report.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_vlm.cli import step as cli_step
from megatron_vlm.data.samples import TASKS, Sample, SampleError
from megatron_vlm.common.storage import atomic_write_bytes, atomic_write_json

PREFIXES = {"": 1, "K": 2**10, "M": 2**20, "B": 2**30, "T": 2**40}
DEFAULT_TASK_MIX = {"extract-single": 0.4, "extract-multi": 0.4, "reasoning": 0.2}
DISTRIBUTIONS = ("pool-native", "long-biased")
LONG_THRESHOLD = 100 * 2**10  # "100K" in the paper's binary prefixes
LONG_BIASED_FRACTION = 0.839  # Table 11: share of >= 100K samples in the long-biased variant


class MixError(ValueError):
    """Settings or inputs that cannot make the requested mixture."""


# ---------------------------------------------------------------------------- parsing
def parse_token_count(text: str) -> int:
    """'5B' -> 5 * 2^30 tokens; K/M/B/T are binary (2^10, 2^20, 2^30, 2^40); plain numbers are tokens."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*", str(text))
    if not match:
        raise MixError(f"cannot read token count {text!r}: use a number with an optional K/M/B/T suffix, e.g. 5B")
    value = float(match.group(1)) * PREFIXES[match.group(2).upper()]
    return int(round(value))


def format_tokens(n: float) -> str:
    for suffix in ("T", "B", "M", "K"):
        if abs(n) >= PREFIXES[suffix]:
            return f"{n / PREFIXES[suffix]:.2f}{suffix}"
    return str(int(n))


@dataclass
class InputSpec:
    path: str
    weight: float = 1.0


def parse_input_spec(text: str) -> InputSpec:
    """``FILE`` or ``FILE:WEIGHT`` (the weight is whatever follows the last colon, when numeric)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return InputSpec(text)
        if weight < 0 or not math.isfinite(weight):
            raise MixError(f"{text}: the weight must be a non-negative number")
        return InputSpec(path, weight)
    return InputSpec(text)


def parse_task_mix(text: Optional[str]) -> Optional[dict[str, float]]:
    """'extract-single:0.4,extract-multi:0.4,reasoning:0.2' -> shares (normalized); 'none' -> None."""
    if text is None:
        return dict(DEFAULT_TASK_MIX)
    if text.strip().lower() in ("none", "files", ""):
        return None
    shares: dict[str, float] = {}
    for item in text.split(","):
        task, sep, value = item.strip().rpartition(":")
        if not sep or task not in TASKS:
            raise MixError(f"--task-mix item {item!r}: expected TASK:SHARE with TASK one of {TASKS}")
        try:
            shares[task] = float(value)
        except ValueError:
            raise MixError(f"--task-mix item {item!r}: {value!r} is not a number") from None
    total = sum(shares.values())
    if total <= 0 or any(v < 0 for v in shares.values()):
        raise MixError(f"--task-mix shares must be non-negative with a positive sum, got {shares}")
    return {task: value / total for task, value in shares.items()}


# ---------------------------------------------------------------------------- LLaVA conversion
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


def llava_to_sample(record: dict, where: str, image_root: Optional[str], default_id: str) -> Sample:
    """A LLaVA conversation record -> ``Sample`` (task ``short``). ``<image>`` marks where each image
    goes (one newline right after it is dropped: Qwen's template puts the image inline); a record
    with images but no marker gets them at the start of its first user turn, as LLaVA does."""
    images = record.get("image", record.get("images"))
    images = [] if images is None else [images] if isinstance(images, str) else list(images)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(f"{where}: LLaVA record without a 'conversations' list")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise SampleError(f"{where}: conversation turn {i} needs 'from' in {sorted(_LLAVA_ROLES)} and a string "
                              "'value'")
        turns.append((_LLAVA_ROLES[turn["from"]], turn["value"]))
    markers = sum(value.count("<image>") for _, value in turns)
    if markers == 0 and images:
        first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
        if first_user is None:
            raise SampleError(f"{where}: images but no human turn to attach them to")
        role, value = turns[first_user]
        turns[first_user] = (role, "<image>\n" * len(images) + value)
    elif markers != len(images):
        raise SampleError(f"{where}: {markers} <image> markers for {len(images)} images")
    messages = []
    for role, value in turns:
        if "<image>" not in value:
            messages.append({"role": role, "content": value})
            continue
        content = []
        for k, piece in enumerate(value.split("<image>")):
            if k > 0:
                content.append({"type": "image"})
                piece = piece[1:] if piece.startswith("\n") else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    sample_id = str(record.get("id", default_id))
    return Sample.from_dict({"id": sample_id, "task": "short", "images": images, "messages": messages,
                             "image_root": image_root, "meta": {"source": "llava"}}, where)


def parse_line(raw: bytes, where: str, short: bool, image_root: Optional[str], default_id: str) -> Sample:
    """A JSONL line as a ``Sample``: the shared format, or (short data) a LLaVA record."""
    try:
        record = json.loads(raw)
    except ValueError as err:
        raise SampleError(f"{where}: not valid JSON ({err})") from None
    if short and isinstance(record, dict) and "conversations" in record:
        return llava_to_sample(record, where, image_root, default_id)
    sample = Sample.from_dict(record, where)
    if short and sample.task != "short":
        sample.task = "short"
    return sample


# ---------------------------------------------------------------------------- configuration
@dataclass
class MixConfig:
    inputs: list[InputSpec]
    output: str
    distribution: str = "pool-native"
    task_mix: Optional[dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_TASK_MIX))
    token_budget: Optional[int] = None  # None: the largest mixture the inputs allow at these ratios
    short_data: list[InputSpec] = field(default_factory=list)
    short_ratio: float = 0.0  # share of the token budget
    short_image_root: Optional[str] = None  # LLaVA image paths are relative to it (default: the file's folder)
    seed: int = 0
    long_threshold: int = LONG_THRESHOLD
    long_fraction: float = LONG_BIASED_FRACTION
    allow_repeat: bool = False  # reuse samples when a pool is smaller than its share of the budget
    max_tokens: Optional[int] = None  # drop longer samples here already (e.g. the training max_seq_len)
    tokenizer_dir: Optional[str] = None
    check_images: bool = False  # also read image headers when records carry image_tokens
    histogram_bins: int = 64

    def validate(self) -> "MixConfig":
        if self.distribution not in DISTRIBUTIONS:
            raise MixError(f"--distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not self.inputs:
            raise MixError("no input files")
        if not 0 <= self.short_ratio < 1:
            raise MixError(f"--short-ratio must be in [0, 1), got {self.short_ratio}")
        if self.short_ratio > 0 and not self.short_data:
            raise MixError("--short-ratio > 0 needs --short-data")
        if self.short_data and self.short_ratio == 0:
            raise MixError("--short-data given but --short-ratio is 0: set the share of short data")
        if not 0 <= self.long_fraction <= 1:
            raise MixError(f"long fraction must be in [0, 1], got {self.long_fraction}")
        missing = [s.path for s in self.inputs + self.short_data if not os.path.isfile(s.path)]
        if missing:
            raise MixError(f"input file(s) not found: {missing}")
        if sum(s.weight for s in self.inputs) <= 0:
            raise MixError("the input weights sum to 0")
        return self

    def fingerprint(self) -> dict:
        out = asdict(self)
        out["input_files"] = [{"path": s.path, "bytes": os.path.getsize(s.path), "mtime_ns": os.stat(s.path).st_mtime_ns}
                              for s in self.inputs + self.short_data]
        return out


# ---------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    file: int  # index into inputs + short_data
    line: int
    offset: int
    task: str
    tokens: int
    pages: int
    short: bool


def _iter_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)


def _image_root(config: MixConfig, spec: InputSpec, short: bool) -> Optional[str]:
    if not short:
        return None
    return config.short_image_root or os.path.dirname(os.path.abspath(spec.path))


def scan_candidates(config: MixConfig, tokenizer, dropped: list[dict], progress: bool = True) -> list[Candidate]:
    """Every usable sample with its exact token count; the rest go to ``dropped``."""
    from tqdm import tqdm

    from megatron_vlm.data.tokenization import TokenizationError, sample_image_sizes

    candidates: list[Candidate] = []
    files = [(s, False) for s in config.inputs] + [(s, True) for s in config.short_data]
    for f_i, (spec, short) in enumerate(files):
        root = _image_root(config, spec, short)
        stem = os.path.splitext(os.path.basename(spec.path))[0]
        for number, offset, raw in tqdm(_iter_lines(spec.path), desc=f"count {os.path.basename(spec.path)}",
                                        unit="sample", disable=not progress, mininterval=2.0):
            cli_step()  # tests only: MVLM_TEST_SLOW_STEP
            where = f"{spec.path}:{number}"
            try:
                sample = parse_line(raw, where, short, root, f"{stem}:{number}")
            except SampleError as err:
                dropped.append({"source": where, "id": None, "reason": err.reason, "detail": str(err)})
                continue
            if config.task_mix is not None and not short and sample.task not in config.task_mix:
                dropped.append({"source": where, "id": sample.id, "reason": "task_not_in_mix", "task": sample.task,
                                "detail": f"{where}: task {sample.task!r} is not in the task mix "
                                          f"{sorted(config.task_mix)}"})
                continue
            try:
                image_tokens = sample.image_tokens
                if image_tokens is None or config.check_images:
                    from megatron_vlm.data.image_processing import image_token_count

                    image_tokens = [image_token_count(h, w) for h, w in sample_image_sizes(sample, where)]
                tokens = tokenizer.count_tokens(sample, image_tokens, where)
            except TokenizationError as err:
                dropped.append({"source": where, "id": sample.id, "reason": err.reason, "detail": str(err)})
                continue
            if config.max_tokens is not None and tokens > config.max_tokens:
                dropped.append({"source": where, "id": sample.id, "reason": "too_long",
                                "detail": f"{where}: {tokens} tokens > --max-seq-len {config.max_tokens}"})
                continue
            candidates.append(Candidate(f_i, number, offset, "short" if short else sample.task, tokens,
                                        len(sample.images), short))
    return candidates


# ---------------------------------------------------------------------------- selection
@dataclass
class Group:
    """Samples competing for one share of the budget: (task, file) pairs, or a short-data file."""

    name: str
    share: float  # of the whole budget
    members: list[int]  # candidate indices
    target: int = 0
    selected: list[int] = field(default_factory=list)
    tokens: int = 0
    passes: int = 0


def build_groups(config: MixConfig, candidates: Sequence[Candidate]) -> list[Group]:
    long_share = 1.0 - config.short_ratio
    by_key: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        key = ("short", c.file) if c.short else (c.task if config.task_mix is not None else None, c.file)
        by_key.setdefault(key, []).append(i)
    n_long = len(config.inputs)
    groups = []
    if config.task_mix is not None:
        absent = [t for t, share in config.task_mix.items() if share > 0
                  and not any(k[0] == t for k in by_key)]
        if absent:
            raise MixError(f"the task mix asks for {absent} but no input holds such samples; give those files or "
                           "pass --task-mix without them")
        for task, share in config.task_mix.items():
            files = [f for f in range(n_long) if (task, f) in by_key]
            weight = sum(config.inputs[f].weight for f in files)
            for f in files:
                if config.inputs[f].weight > 0 and share > 0:
                    groups.append(Group(f"{task}@{os.path.basename(config.inputs[f].path)}",
                                        long_share * share * config.inputs[f].weight / weight, by_key[(task, f)]))
    else:
        weight = sum(s.weight for f, s in enumerate(config.inputs) if (None, f) in by_key)
        if weight <= 0:
            raise MixError("the input files with usable samples all have weight 0")
        for f, spec in enumerate(config.inputs):
            if (None, f) in by_key and spec.weight > 0:
                groups.append(Group(os.path.basename(spec.path), long_share * spec.weight / weight, by_key[(None, f)]))
    if config.short_data:
        short_files = [n_long + k for k in range(len(config.short_data)) if ("short", n_long + k) in by_key]
        if not short_files:
            raise MixError("--short-data holds no usable sample (see the report)")
        weight = sum(config.short_data[f - n_long].weight for f in short_files)
        for f in short_files:
            spec = config.short_data[f - n_long]
            if spec.weight > 0:
                groups.append(Group(f"short@{os.path.basename(spec.path)}",
                                    config.short_ratio * spec.weight / weight, by_key[("short", f)]))
    if not groups:
        raise MixError("no usable samples in the inputs (see the report)")
    return groups


def _take(group: Group, candidates: Sequence[Candidate], config: MixConfig, rng: np.random.Generator,
          long_biased: bool) -> None:
    """Draw members until the group's target is met (or its pool, without --allow-repeat, runs out)."""
    members = np.asarray(group.members)
    lengths = np.asarray([candidates[i].tokens for i in members])
    if long_biased:
        streams = [members[lengths >= config.long_threshold], members[lengths < config.long_threshold]]
    else:
        streams = [members]
    queues = [list(rng.permutation(s)) for s in streams]
    group.passes = 1
    while group.tokens < group.target:
        alive = [k for k, q in enumerate(queues) if q]
        if not alive:
            if not config.allow_repeat:
                break
            queues = [list(rng.permutation(s)) for s in streams]
            group.passes += 1
            continue
        if long_biased and len(alive) == 2:
            k = 0 if rng.random() < config.long_fraction else 1
        else:
            k = alive[0]
        i = int(queues[k].pop())
        group.selected.append(i)
        group.tokens += candidates[i].tokens


def select(config: MixConfig, candidates: Sequence[Candidate], groups: list[Group]) -> tuple[list[int], int]:
    """Fill every group; returns (selected candidate indices in output order, the budget used)."""
    if config.token_budget is not None:
        budget = int(config.token_budget)
    else:  # the largest budget every group can fill without repeating samples
        budget = int(min(sum(candidates[i].tokens for i in g.members) / g.share for g in groups if g.share > 0))
    for k, g in enumerate(groups):  # each group draws from its own seeded stream
        g.target = int(round(budget * g.share))
        long_biased = config.distribution == "long-biased" and not candidates[g.members[0]].short
        _take(g, candidates, config, np.random.default_rng([config.seed, 1, k]), long_biased)
    order = [i for g in groups for i in g.selected]
    shuffle = np.random.default_rng([config.seed, 2]).permutation(len(order))
    return [order[k] for k in shuffle], budget


# ---------------------------------------------------------------------------- statistics
def table_stats(items: Sequence[Candidate], threshold: int = LONG_THRESHOLD) -> dict:
    """One row of Table 10 (+ the Table 11 share) for these samples."""
    if not items:
        return {"samples": 0}
    tokens = np.asarray([c.tokens for c in items], dtype=np.int64)
    pages = np.asarray([c.pages for c in items], dtype=np.int64)
    return {"samples": len(items), "pages_mean": float(pages.mean()), "tokens_mean_k": float(tokens.mean() / 2**10),
            "total_tokens": int(tokens.sum()), "total_tokens_b": float(tokens.sum() / 2**30),
            "page_range": [int(pages.min()), int(pages.max())],
            "token_range_k": [float(tokens.min() / 2**10), float(tokens.max() / 2**10)],
            "share_at_least_threshold": float((tokens >= threshold).mean()), "threshold": threshold}


def mixture_stats(items: Sequence[Candidate], threshold: int = LONG_THRESHOLD) -> dict:
    tasks = sorted({c.task for c in items}, key=lambda t: (TASKS.index(t) if t in TASKS else 99, t))
    return {"per_task": {t: table_stats([c for c in items if c.task == t], threshold) for t in tasks},
            "total": table_stats(items, threshold)}


def format_stats_table(stats: dict, title: str = "mixture") -> str:
    """Markdown like the paper's Table 10 with Table 11's >= 100K column (K = 2^10, B = 2^30)."""
    lines = [f"### {title}", "",
             "| Task | # Samples | # Pages | # Tokens (K) | Total Tokens (B) | Page Range | Token Range (K) | >= 100K |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    rows = list(stats["per_task"].items()) + [("**Total**", stats["total"])]
    for name, s in rows:
        if not s.get("samples"):
            lines.append(f"| {name} | 0 | | | | | | |")
            continue
        lines.append(f"| {name} | {s['samples']:,} | {s['pages_mean']:.1f} | {s['tokens_mean_k']:.1f} | "
                     f"{s['total_tokens_b']:.3g} | [{s['page_range'][0]}, {s['page_range'][1]}] | "
                     f"[{s['token_range_k'][0]:.1f}, {s['token_range_k'][1]:.1f}] | "
                     f"{100 * s['share_at_least_threshold']:.1f}% |")
    return "\n".join(lines) + "\n"


def histogram_axis(tokens_k: Sequence[float], bins: int = 64) -> dict:
    """Where the histogram's bars go, from the data alone: ``scale`` ("log" when the lengths span
    more than a factor of 20, else "linear"), bin ``edges`` covering [shortest, longest] (log-spaced
    on a log axis) and the axis ``xlim`` with a small margin -- never a fixed 0-100K range, so short
    samples are not a sliver at the left edge. ``threshold`` says whether the 100K line falls inside."""
    values = [float(v) for v in tokens_k if v > 0]
    if not values:
        return {"scale": "linear", "edges": np.linspace(0, 1, bins + 1), "xlim": (0.0, 1.0), "threshold": False}
    lo, hi = min(values), max(values)
    if hi / lo > 20:
        edges = np.geomspace(lo / 1.001, hi * 1.001, bins + 1)
        xlim = (lo / 1.25, hi * 1.25)
        scale = "log"
    else:
        pad = max((hi - lo) * 0.05, hi * 0.02, 1 / 2**10)
        edges = np.linspace(lo - pad / 4, hi + pad / 4, bins + 1)
        xlim = (max(0.0, lo - pad), hi + pad)
        scale = "linear"
    threshold_k = LONG_THRESHOLD / 2**10
    return {"scale": scale, "edges": edges, "xlim": xlim, "threshold": xlim[0] <= threshold_k <= xlim[1]}


def plot_histogram(items: Sequence[Candidate], path: str, bins: int = 64, title: str = "") -> dict:
    """Token-length histogram per task (stacked), as the paper's Figure 7; written atomically.

    The x axis follows the data (:func:`histogram_axis`: log when lengths span decades), the 100K
    line is drawn only where it falls inside, and the legend sits outside the plot, right of it, so
    it never covers bars. Returns the axis layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({c.task for c in items})
    data = [[c.tokens / 2**10 for c in items if c.task == t] for t in tasks]
    layout = histogram_axis([c.tokens / 2**10 for c in items], bins)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    if items:
        counts = {t: len(d) for t, d in zip(tasks, data)}
        ax.hist(data, bins=layout["edges"], stacked=True, label=[f"{t} ({counts[t]:,})" for t in tasks])
        threshold_k = LONG_THRESHOLD / 2**10
        if layout["threshold"]:
            ax.axvline(threshold_k, color="k", linestyle="--", linewidth=1, label="100K")
        ax.set_xscale(layout["scale"])
        ax.set_xlim(*layout["xlim"])
        if layout["scale"] == "log":
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}K"))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9, frameon=False)
        if not layout["threshold"]:
            side = "below" if layout["xlim"][1] < threshold_k else "above"
            ax.text(0.99, 0.97, f"all samples {side} 100K", transform=ax.transAxes, ha="right", va="top",
                    fontsize=8, color="0.35")
    ax.set_xlabel("tokens per sample (K = 1,024)" + (", log scale" if layout["scale"] == "log" else ""))
    ax.set_ylabel("samples")
    ax.set_title(title or f"token lengths ({len(items):,} samples)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return layout


# ---------------------------------------------------------------------------- the run
def output_paths(output: str) -> dict[str, str]:
    stem = output[:-6] if output.endswith(".jsonl") else output
    return {"mixture": output, "stats": stem + ".stats.json", "table": stem + ".stats.md",
            "histogram": stem + ".hist.png", "report": stem + ".report.json"}


def _write_mixture(config: MixConfig, candidates: Sequence[Candidate], order: Sequence[int], path: str) -> None:
    files = [s for s in config.inputs] + [s for s in config.short_data]
    handles = {}
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for i in order:
                c = candidates[i]
                spec = files[c.file]
                f = handles.get(c.file) or handles.setdefault(c.file, open(spec.path, "rb"))
                f.seek(c.offset)
                raw = f.readline()
                where = f"{spec.path}:{c.line}"
                if c.short:
                    stem = os.path.splitext(os.path.basename(spec.path))[0]
                    sample = parse_line(raw, where, True, _image_root(config, spec, True), f"{stem}:{c.line}")
                    out.write(sample.to_json() + "\n")
                else:
                    out.write(raw.decode("utf-8").rstrip("\n").rstrip("\r") + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        for f in handles.values():
            f.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def _left_out_tasks(config: MixConfig, dropped: list[dict]) -> list[str]:
    """One warning per task whose samples were all left out because --task-mix does not name it."""
    counts: dict[str, int] = {}
    for d in dropped:
        if d["reason"] == "task_not_in_mix":
            counts[d.get("task", "?")] = counts.get(d.get("task", "?"), 0) + 1
    out = []
    for task, n in sorted(counts.items()):
        example = ",".join(f"{t}:{share:g}" for t, share in (config.task_mix or {}).items()) + f",{task}:0.1"
        out.append(f"{n} sample(s) of task {task!r} left out: {task} is not in --task-mix; to include it, "
                   f"give it a share, e.g. --task-mix {example} (or --task-mix none: file weights alone)")
    return out


def _drop_summary(dropped: list[dict], config: MixConfig) -> str:
    counts: dict[str, int] = {}
    for d in dropped:
        counts[d["reason"]] = counts.get(d["reason"], 0) + 1
    parts = []
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        parts.append(f"{n} too_long over --max-seq-len {config.max_tokens}" if reason == "too_long"
                     else f"{n} {reason}")
    return ", ".join(parts)


def _write_failure_report(path: str, dropped: list[dict]) -> None:
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    atomic_write_json(path, {"dropped": dropped, "dropped_by_reason": dict(sorted(reasons.items())), "groups": {},
                             "warnings": ["no mixture was written"]})


def mix(config: MixConfig, tokenizer=None, progress: bool = True, force: bool = False, log=print) -> dict:
    """Make the mixture and its statistics, histogram and report. Returns the statistics."""
    config.validate()
    paths = output_paths(config.output)
    fingerprint = config.fingerprint()
    if not force and all(os.path.isfile(p) for p in paths.values()):
        with open(paths["stats"]) as f:
            previous = json.load(f)
        if previous.get("config") == json.loads(json.dumps(fingerprint)):
            log(f"{config.output} is up to date (same inputs and settings); --force remakes it")
            return previous
    if tokenizer is None:
        from megatron_vlm.data.tokenization import SampleTokenizer

        tokenizer = SampleTokenizer(config.tokenizer_dir)
    dropped: list[dict] = []
    candidates = scan_candidates(config, tokenizer, dropped, progress)
    if not candidates:  # an empty mixture is a failure, with the reason (and the report to read)
        _write_failure_report(paths["report"], dropped)
        if not dropped:
            raise MixError(f"no sample in the input file(s) {[s.path for s in config.inputs + config.short_data]}")
        raise MixError(f"every sample was dropped ({_drop_summary(dropped, config)}); see {paths['report']}")
    groups = build_groups(config, candidates)
    order, budget = select(config, candidates, groups)
    if not order:
        _write_failure_report(paths["report"], dropped)
        raise MixError(f"the mixture is empty: a token budget of {format_tokens(budget)} takes no sample "
                       f"(the shortest usable one has {min(c.tokens for c in candidates):,} tokens); raise "
                       "--token-budget")
    chosen = [candidates[i] for i in order]
    warnings = _left_out_tasks(config, dropped)
    for g in groups:
        if g.tokens < g.target:
            warnings.append(f"{g.name}: only {format_tokens(g.tokens)} of its {format_tokens(g.target)} target "
                            f"(the pool has {len(g.members)} samples; --allow-repeat reuses them)")
        if g.passes > 1:
            warnings.append(f"{g.name}: samples reused ({g.passes} passes over the pool)")
    if config.distribution == "long-biased":
        for g in groups:
            sel = [candidates[i] for i in g.selected if not candidates[i].short]
            if sel:
                share = float(np.mean([c.tokens >= config.long_threshold for c in sel]))
                if share < config.long_fraction - 0.05:
                    warnings.append(f"{g.name}: only {100 * share:.1f}% of the samples are >= "
                                    f"{format_tokens(config.long_threshold)} (asked {100 * config.long_fraction:.1f}%): "
                                    "the pool lacks long samples")
    used = {}
    for g in groups:
        unique = set(g.selected)
        used[g.name] = {"share": g.share, "target_tokens": g.target, "selected_tokens": g.tokens,
                        "selected_samples": len(g.selected), "distinct_samples": len(unique),
                        "available_samples": len(g.members),
                        "available_tokens": int(sum(candidates[i].tokens for i in g.members)),
                        "unused_samples": len(g.members) - len(unique)}
    grouped = {i for g in groups for i in g.members}
    for i, c in enumerate(candidates):  # weight 0 or a task share of 0: usable but never drawn
        if i not in grouped:
            spec = (config.inputs + config.short_data)[c.file]
            dropped.append({"source": f"{spec.path}:{c.line}", "id": None, "reason": "zero_weight",
                            "detail": f"{spec.path}:{c.line}: its file or task has weight 0"})
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    report = {"dropped": dropped, "dropped_by_reason": dict(sorted(reasons.items())), "groups": used,
              "warnings": warnings}
    stats = {"config": json.loads(json.dumps(fingerprint)), "budget_tokens": budget,
             "budget": format_tokens(budget), "mixture": mixture_stats(chosen, config.long_threshold),
             "available": mixture_stats(candidates, config.long_threshold), "groups": used,
             "dropped_by_reason": report["dropped_by_reason"]}
    _write_mixture(config, candidates, order, paths["mixture"])
    table = (format_stats_table(stats["mixture"], f"mixture ({config.distribution}, budget {format_tokens(budget)})")
             + "\n" + format_stats_table(stats["available"], "available (all usable input samples)"))
    atomic_write_bytes(paths["table"], table.encode())
    plot_histogram(chosen, paths["histogram"], config.histogram_bins,
                   f"{config.distribution} mixture: {len(chosen):,} samples, {format_tokens(budget)} budget")
    atomic_write_json(paths["report"], report)
    atomic_write_json(paths["stats"], stats)  # last: marks the run complete
    log(table)
    log(f"dropped {len(dropped)} lines {report['dropped_by_reason']} (details: {paths['report']})")
    for w in warnings:
        log(f"warning: {w}")
    return stats


__all__ = ["DEFAULT_TASK_MIX", "DISTRIBUTIONS", "InputSpec", "LONG_THRESHOLD", "MixConfig", "MixError",
           "format_stats_table", "format_tokens", "llava_to_sample", "mix", "mixture_stats", "parse_input_spec",
           "histogram_axis", "parse_task_mix", "parse_token_count", "plot_histogram", "table_stats"]
