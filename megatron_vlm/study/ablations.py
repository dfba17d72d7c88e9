"""The paper's ablations as data: each study is a list of variants, and each variant claims the
settings it trains with (task token shares, length distribution, short-data share, mRoPE base).

The claims are what the runner checks the built data and the saved run config against
(``megatron_vlm/study/checks.py``), so a study cannot silently train on something else. Variant names
follow the paper's row labels, so ``tools/compare_runs.py --paper-table`` puts the published row
under each run (``ratio_8_2`` = Table 2's 8:2, ``short_20`` = 20%, ``extract-single_long`` =
Table 14's extract-single long-biased, ``reasoning_rope8e6`` = Table 16's reasoning base 8e6).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

VQA_TASKS = ("extract-single", "extract-multi", "reasoning")
OCR_TASKS = ("ocr-full", "ocr-needle")
DISTRIBUTIONS = ("pool-native", "long-biased")
DEFAULT_ROPE_THETA = 4e6  # Dynamic-NTK for 32K -> 128K (Section 3, Appendix G.3)
FINAL_TASK_MIX = (("extract-single", 0.4), ("extract-multi", 0.4), ("reasoning", 0.2))  # 8:2, Appendix A


@dataclass(frozen=True)
class DataSetting:
    """What a variant's training data must be. ``task_mix``: token shares of the long-context part
    (sum 1); ``short_ratio``: the short-context share of the whole budget."""

    task_mix: tuple[tuple[str, float], ...]
    distribution: str = "pool-native"
    short_ratio: float = 0.0

    def __post_init__(self):
        total = sum(share for _, share in self.task_mix)
        if abs(total - 1.0) > 1e-9 or any(share < 0 for _, share in self.task_mix):
            raise ValueError(f"task shares must be non-negative and sum to 1, got {self.task_mix}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if not 0 <= self.short_ratio < 1:
            raise ValueError(f"short_ratio must be in [0, 1), got {self.short_ratio}")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, share in self.task_mix if share > 0)

    def shares(self) -> dict[str, float]:
        """Expected token share of every task in the whole mixture (short data included as ``short``)."""
        out = {task: (1 - self.short_ratio) * share for task, share in self.task_mix if share > 0}
        if self.short_ratio > 0:
            out["short"] = self.short_ratio
        return out

    def task_mix_arg(self) -> str:
        """``--task-mix`` of tools/mix_data.py."""
        return ",".join(f"{task}:{share:g}" for task, share in self.task_mix if share > 0)

    def slug(self) -> str:
        abbrev = {"extract-single": "es", "extract-multi": "em", "reasoning": "re", "ocr-full": "ocrf",
                  "ocr-needle": "ocrn"}
        parts = [f"{abbrev[t]}{round(100 * s)}" for t, s in self.task_mix if s > 0]
        parts.append("native" if self.distribution == "pool-native" else "long")
        if self.short_ratio:
            parts.append(f"short{round(100 * self.short_ratio)}")
        return "-".join(parts)


@dataclass(frozen=True)
class Variant:
    name: str  # the paper's row label in compare_runs' matching (letters and digits, case ignored)
    data: DataSetting
    rope_theta: float = DEFAULT_ROPE_THETA
    overrides: tuple[str, ...] = ()  # further trainer --set key=value

    def train_overrides(self) -> list[str]:
        return [f"model.rope_theta={float(self.rope_theta)!r}", *self.overrides]

    def claims(self) -> dict:
        return {"task_shares": self.data.shares(), "distribution": self.data.distribution,
                "short_ratio": self.data.short_ratio, "rope_theta": self.rope_theta}


@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    source: str  # where in the paper
    paper_table: str  # tools/compare_runs.py --paper-table
    variants: tuple[Variant, ...]
    short_context_eval: bool = False  # Table 3: also export to HF and write the VLMEvalKit commands
    note: str = ""

    @property
    def needs_short_data(self) -> bool:
        return any(v.data.short_ratio > 0 for v in self.variants)

    @property
    def tasks(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for v in self.variants:
            for t in v.data.tasks:
                seen[t] = None
        return tuple(seen)

    def select(self, names: Optional[list[str]]) -> "Ablation":
        """The study restricted to ``names`` (unknown names are an error naming the known ones)."""
        if not names:
            return self
        known = {v.name: v for v in self.variants}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{self.name}: unknown variant(s) {unknown}; choose from {list(known)}")
        return Ablation(self.name, self.title, self.source, self.paper_table,
                        tuple(v for v in self.variants if v.name in names), self.short_context_eval, self.note)


def single_task(task: str, distribution: str = "pool-native") -> DataSetting:
    return DataSetting(((task, 1.0),), distribution)


def extraction_reasoning(extraction: int, reasoning: int) -> DataSetting:
    """Section 5.2: extraction = extract-single and extract-multi evenly; ``extraction + reasoning = 10``."""
    if extraction + reasoning != 10 or extraction < 0 or reasoning < 0:
        raise ValueError(f"ratio {extraction}:{reasoning} must be two non-negative parts of 10")
    mix = []
    if extraction:
        mix += [("extract-single", extraction / 20), ("extract-multi", extraction / 20)]
    if reasoning:
        mix.append(("reasoning", reasoning / 10))
    return DataSetting(tuple(mix))


def final_data(short_ratio: float = 0.0) -> DataSetting:
    return DataSetting(FINAL_TASK_MIX, "pool-native", short_ratio)


def _table1() -> Ablation:
    tasks = {"extract-single": "extract-single", "extract-multi": "extract-multi", "reasoning": "reasoning",
             "OCR-full": "ocr-full", "OCR-needle": "ocr-needle"}
    return Ablation("table1_tasks", "one training task per run at equal token budgets", "Table 1 (Section 4.4)",
                    "table1", tuple(Variant(name, single_task(task)) for name, task in tasks.items()),
                    note="the paper's OCR (SFT) rows add a 5B-token SFT stage, not part of this study")


def _fig2() -> Ablation:
    variants = []
    for task in VQA_TASKS:
        variants.append(Variant(f"{task}_native", single_task(task, "pool-native")))
        variants.append(Variant(f"{task}_long", single_task(task, "long-biased")))
    return Ablation("fig2_length", "pool-native vs long-biased length distribution per task",
                    "Figure 2 / Table 14 (Section 5.1)", "fig2", tuple(variants),
                    note="long-biased data needs long samples: give --long-vqa with 50-100-page documents' "
                         "samples as the paper did (Appendix D.2)")


def _table2() -> Ablation:
    return Ablation("table2_ratio", "extraction:reasoning token ratio 0:10 ... 10:0", "Table 2 (Section 5.2)",
                    "table2", tuple(Variant(f"ratio_{e}_{10 - e}", extraction_reasoning(e, 10 - e))
                                    for e in range(0, 11, 2)))


def _table3() -> Ablation:
    return Ablation("table3_short", "short-context data share of the budget (8:2 long mixture)",
                    "Table 3 / Figure 3 / Table 15 (Section 5.3)", "table3",
                    tuple(Variant(f"short_{pct}", final_data(pct / 100)) for pct in (0, 20, 40)),
                    short_context_eval=True,
                    note="the paper also ran 60% and 80%; short-context scores (Table 3) come from VLMEvalKit "
                         "on the HF exports (commands written, not run)")


def _table16() -> Ablation:
    variants = []
    for task in VQA_TASKS:
        for base in (1, 2, 4, 8):
            variants.append(Variant(f"{task}_rope{base}e6", single_task(task), rope_theta=base * 1e6))
    return Ablation("table16_rope", "mRoPE base 1e6 (unchanged), 2e6, 4e6 (Dynamic-NTK), 8e6 per task",
                    "Table 16 (Appendix G.3)", "table16", tuple(variants),
                    note="the paper's grid is 2e6/4e6/8e6; 1e6 (the 32K model's own base) is added as the "
                         "no-rescaling reference")


def _final() -> Ablation:
    return Ablation("final", "the MMProLong recipe: 8:2, pool-native, no short data, mRoPE base 4e6",
                    "Table 4 / Appendix A", "table4", (Variant("final", final_data()),))


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (_table1(), _fig2(), _table2(), _table3(), _table16(), _final())}


def settings_digest(payload: dict) -> str:
    """Short stable hash of a settings dict (names the data and run folders; same settings, same folder)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]


__all__ = ["ABLATIONS", "Ablation", "DataSetting", "DEFAULT_ROPE_THETA", "FINAL_TASK_MIX", "OCR_TASKS",
           "VQA_TASKS", "Variant", "extraction_reasoning", "final_data", "settings_digest", "single_task"]
