"""Pack samples into rows of at most ``max_seq_len`` tokens: best-fit decreasing, deterministic.

A sample is never split across rows (its answer needs its pages), and documents inside a row
never attend to each other (the batch carries ``cu_seqlens``). With context parallelism every
document is padded to a multiple of 2·CP (x TP under sequence parallelism) before packing, so the
padded row still fits.

Best-fit decreasing: longest first, each into the open row whose remaining room is the smallest
that still fits it. The room lookup is a segment tree over remaining capacities (log C per
sample), so a million samples pack in seconds. Ties in length are broken by a seeded permutation,
which makes the plan a pure function of (lengths, max_seq_len, pad multiple, seed).

How good a plan can be depends on the lengths: every sample longer than half a row needs a row of
its own, so pool-native long-document data (32K-127K tokens, mostly > 64K) cannot fill 128K rows
much beyond ~77% whatever the algorithm. ``packing_stats`` reports the efficiency next to the
Martello-Toth lower bound on the number of rows, which shows how far from optimal a plan is.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_vlm.common.storage import atomic_write_bytes


def pad_multiple_for(cp_size: int = 1, tp_size: int = 1, sequence_parallel: bool = False) -> int:
    """Tokens each document is padded to a multiple of: 2·CP for the load-balanced split, times TP
    when sequence parallelism also splits the sequence over tensor-parallel ranks."""
    multiple = 2 * cp_size if cp_size > 1 else 1
    if sequence_parallel and tp_size > 1:
        multiple *= tp_size
    return multiple


def padded_lengths(lengths: np.ndarray, multiple: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return (lengths + multiple - 1) // multiple * multiple


@dataclass
class PackPlan:
    """Which samples form each row: row ``r`` is ``sample_index[row_offsets[r]:row_offsets[r+1]]``."""

    row_offsets: np.ndarray  # int64 [R+1]
    sample_index: np.ndarray  # int64 [N]
    max_seq_len: int
    pad_multiple: int = 1
    seed: int = 0
    stats: Optional[dict] = None

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.sample_index[self.row_offsets[r]:self.row_offsets[r + 1]]

    def rows(self) -> list[np.ndarray]:
        return [self.row(r) for r in range(len(self))]

    def save(self, path: str) -> None:
        """One ``.npz`` (arrays + settings), written atomically."""
        buffer = io.BytesIO()
        settings = {"max_seq_len": self.max_seq_len, "pad_multiple": self.pad_multiple, "seed": self.seed,
                    "stats": self.stats or {}}
        np.savez(buffer, row_offsets=self.row_offsets, sample_index=self.sample_index,
                 settings=np.frombuffer(json.dumps(settings).encode(), dtype=np.uint8))
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "PackPlan":
        with np.load(path) as data:
            settings = json.loads(data["settings"].tobytes().decode())
            return cls(data["row_offsets"].astype(np.int64), data["sample_index"].astype(np.int64),
                       int(settings["max_seq_len"]), int(settings["pad_multiple"]), int(settings["seed"]),
                       settings.get("stats") or None)

    def validate(self, lengths: np.ndarray) -> None:
        """Every sample exactly once, every padded row within ``max_seq_len``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.sample_index) != len(lengths) or not np.array_equal(
                np.sort(self.sample_index), np.arange(len(lengths))):
            raise ValueError(f"the pack plan does not hold each of the {len(lengths)} samples exactly once "
                             "(was it made for another dataset?)")
        sums = np.add.reduceat(padded_lengths(lengths, self.pad_multiple)[self.sample_index],
                               self.row_offsets[:-1]) if len(self) else np.zeros(0)
        if len(sums) and sums.max() > self.max_seq_len:
            raise ValueError(f"a packed row holds {int(sums.max())} tokens > max_seq_len {self.max_seq_len}")


class _RoomTree:
    """Open rows counted by remaining room 0..C; finds the smallest room >= a need in O(log C)."""

    def __init__(self, capacity: int):
        size = 1
        while size < capacity + 1:
            size *= 2
        self.size = size
        self.count = [0] * (2 * size)

    def add(self, room: int, delta: int) -> None:
        i = room + self.size
        while i:
            self.count[i] += delta
            i >>= 1

    def smallest_at_least(self, need: int) -> int:
        """The smallest room >= ``need`` that some open row has, or -1."""
        count, i = self.count, need + self.size
        if count[i]:
            return need
        while i > 1:  # climb until a right sibling subtree has an open row
            if not i & 1 and count[i + 1]:
                i += 1
                break
            i >>= 1
        else:
            return -1
        while i < self.size:  # then descend to its leftmost open room
            i = 2 * i if count[2 * i] else 2 * i + 1
        return i - self.size


def pack_best_fit_decreasing(lengths: Sequence[int], max_seq_len: int, pad_multiple: int = 1,
                             seed: int = 0) -> PackPlan:
    """Best-fit-decreasing plan over padded lengths. Raises if a padded sample exceeds a row."""
    start = time.perf_counter()
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_seq_len % pad_multiple:
        raise ValueError(f"max_seq_len {max_seq_len} is not a multiple of the padding multiple {pad_multiple}")
    sizes = padded_lengths(lengths, pad_multiple)
    too_long = np.flatnonzero(sizes > max_seq_len)
    if len(too_long):
        raise ValueError(f"{len(too_long)} samples (e.g. index {int(too_long[0])}: {int(lengths[too_long[0]])} "
                         f"tokens, {int(sizes[too_long[0]])} padded) do not fit a row of {max_seq_len}: "
                         "preprocess with a matching --max-seq-len so they are dropped or truncated")
    if (lengths <= 0).any():
        raise ValueError("samples must have at least one token")
    shuffled = np.random.default_rng(seed).permutation(len(sizes))
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    tree = _RoomTree(max_seq_len)
    open_rows: dict[int, list[int]] = {}  # room -> rows with that room (a stack: deterministic)
    members: list[list[int]] = []
    for i in order.tolist():
        need = int(sizes[i])
        room = tree.smallest_at_least(need)
        if room < 0:
            row = len(members)
            members.append([i])
        else:
            row = open_rows[room].pop()
            tree.add(room, -1)
            members[row].append(i)
        left = (room if room >= 0 else max_seq_len) - need
        if left > 0:
            open_rows.setdefault(left, []).append(row)
            tree.add(left, 1)
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(m) for m in members])
    index = np.fromiter((i for m in members for i in m), dtype=np.int64, count=int(offsets[-1]))
    plan = PackPlan(offsets, index, max_seq_len, pad_multiple, seed)
    plan.stats = packing_stats(plan, lengths, seconds=time.perf_counter() - start)
    return plan


def lower_bound_rows(sizes: Sequence[int], capacity: int) -> int:
    """Martello-Toth L2 lower bound on the rows any packing needs (never splitting a sample)."""
    s = np.sort(np.asarray(sizes, dtype=np.int64))
    if not len(s):
        return 0
    prefix = np.concatenate([[0], np.cumsum(s)])
    half = capacity // 2
    ks = np.unique(np.concatenate([[0], s[s <= half]]))

    def count_le(x):
        return np.searchsorted(s, x, side="right")

    def count_lt(x):
        return np.searchsorted(s, x, side="left")

    n = len(s)
    j1 = n - count_le(capacity - ks)  # > C - k: alone in a row
    lo2, hi2 = count_le(half), count_le(capacity - ks)  # (C/2, C-k]
    j2_count = np.maximum(hi2 - lo2, 0)
    j2_sum = prefix[np.maximum(hi2, lo2)] - prefix[lo2]
    lo3 = count_lt(ks)  # [k, C/2]
    j3_sum = prefix[lo2] - prefix[np.minimum(lo3, lo2)]
    spill = np.maximum(0, -((j2_count * capacity - j2_sum - j3_sum) // capacity))  # ceil of the overflow
    l2 = int((j1 + j2_count + spill).max())
    return max(l2, int(-(-int(prefix[-1]) // capacity)))


def packing_stats(plan: PackPlan, lengths: np.ndarray, seconds: float = 0.0) -> dict:
    """Efficiency (real tokens / row capacity), padding, and the distance to a lower bound."""
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = padded_lengths(lengths, plan.pad_multiple)
    rows = len(plan)
    real, padded = int(lengths.sum()), int(sizes.sum())
    bound = lower_bound_rows(sizes, plan.max_seq_len)
    docs = np.diff(plan.row_offsets)
    capacity = rows * plan.max_seq_len
    return {
        "rows": rows, "samples": int(len(lengths)), "max_seq_len": plan.max_seq_len,
        "pad_multiple": plan.pad_multiple, "seed": plan.seed, "real_tokens": real,
        "padding_tokens": padded - real,
        "efficiency": real / capacity if capacity else 0.0,
        "efficiency_with_padding": padded / capacity if capacity else 0.0,
        "lower_bound_rows": bound,
        "best_possible_efficiency": real / (bound * plan.max_seq_len) if bound else 0.0,
        "docs_per_row_mean": float(docs.mean()) if rows else 0.0, "docs_per_row_max": int(docs.max()) if rows else 0,
        "seconds": round(seconds, 3),
    }


def format_packing_stats(stats: dict) -> str:
    return (f"packed {stats['samples']} samples into {stats['rows']} rows of {stats['max_seq_len']} tokens: "
            f"efficiency {100 * stats['efficiency']:.2f}% real tokens / capacity "
            f"({100 * stats['efficiency_with_padding']:.2f}% with {stats['padding_tokens']} CP padding tokens; "
            f"pad multiple {stats['pad_multiple']}); best possible without splitting samples "
            f"{100 * stats['best_possible_efficiency']:.2f}% ({stats['lower_bound_rows']} rows, Martello-Toth "
            f"bound); {stats['docs_per_row_mean']:.2f} documents per row on average")


__all__ = ["PackPlan", "format_packing_stats", "lower_bound_rows", "pack_best_fit_decreasing", "packing_stats",
           "pad_multiple_for", "padded_lengths"]
