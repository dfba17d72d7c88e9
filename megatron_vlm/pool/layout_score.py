"""Score layout labels against hand-labelled regions: per-label precision, recall and F1.

A predicted block is correct when it overlaps a labelled region of the same label with IoU >=
``iou`` (one-to-one, best overlaps first). Regions labelled ``ignore`` (code fragments, diagram
letters, navigation bars: things with no label in our set) neither count as truth nor punish a
prediction that lies on them. Figures are not scored (they come from image boxes, not labels).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

SCORED_LABELS = ("title", "section", "paragraph", "list", "table", "caption", "header", "footer")
IGNORE = "ignore"

Box = Sequence[float]


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside_share(a: Box, region: Box) -> float:
    """Share of ``a``'s area inside ``region``."""
    ix = max(0.0, min(a[2], region[2]) - max(a[0], region[0]))
    iy = max(0.0, min(a[3], region[3]) - max(a[1], region[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if area > 0 else 1.0


@dataclass
class LabelCounts:
    tp: int = 0
    predicted: int = 0
    truth: int = 0

    @property
    def precision(self) -> float:
        return self.tp / self.predicted if self.predicted else (1.0 if not self.truth else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / self.truth if self.truth else (1.0 if not self.predicted else 0.0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class Score:
    """Counts per label, summed over pages."""

    labels: dict[str, LabelCounts] = field(default_factory=lambda: {k: LabelCounts() for k in SCORED_LABELS})

    def add_page(self, predicted: Iterable[tuple[str, Box]], truth: Iterable[tuple[str, Box]], min_iou: float) -> None:
        truth = list(truth)
        predicted = list(predicted)
        ignored = [box for label, box in truth if label == IGNORE]
        for label in SCORED_LABELS:
            gold = [box for lab, box in truth if lab == label]
            pred = [box for lab, box in predicted if lab == label]
            # a prediction lying on an ignored region is neither right nor wrong
            pred = [box for box in pred
                    if not any(_inside_share(box, region) >= 0.5 or iou(box, region) >= min_iou for region in ignored)
                    or any(iou(box, g) >= min_iou for g in gold)]
            pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)), reverse=True)
            used_p, used_g = set(), set()
            for value, i, j in pairs:
                if value < min_iou:
                    break
                if i not in used_p and j not in used_g:
                    used_p.add(i)
                    used_g.add(j)
            counts = self.labels[label]
            counts.tp += len(used_p)
            counts.predicted += len(pred)
            counts.truth += len(gold)

    def macro_f1(self, labels: Sequence[str] = SCORED_LABELS) -> float:
        present = [self.labels[k] for k in labels if self.labels[k].truth]
        return sum(c.f1 for c in present) / len(present) if present else 0.0

    def as_dict(self) -> dict:
        return {"macro_f1": round(self.macro_f1(), 4),
                "labels": {k: {"precision": round(c.precision, 4), "recall": round(c.recall, 4), "f1": round(c.f1, 4),
                               "tp": c.tp, "predicted": c.predicted, "truth": c.truth}
                           for k, c in self.labels.items()}}


def load_labels(folder: str) -> dict:
    """``labels.json`` of a labelled-pages folder (see tests/data/layout_labels/SOURCES.md)."""
    path = os.path.join(folder, "labels.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("schema") != 1 or not isinstance(data.get("pages"), list):
        raise ValueError(f"{path}: not a schema-1 labels file (keys schema=1, pages=[...])")
    return data


__all__ = ["IGNORE", "SCORED_LABELS", "LabelCounts", "Score", "iou", "load_labels"]
