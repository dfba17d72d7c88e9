"""Does the built data (and the trained run) match what its variant claims?

``tools/mix_data.py`` writes MIX.stats.json: per task the sample count, total tokens, the longest
sample and the share of samples >= the long threshold, for the mixture and for everything the inputs
held (``available``). Checked against a :class:`~megatron_vlm.study.ablations.Variant`'s claims:

* task token shares (short data as task ``short``): each task's tokens against its target, the
  budget x its share: the mixer stops a task at the first sample that reaches the target, so it may
  overshoot by one sample (that task's longest), plus ``abs_tol`` of the budget either way (its
  share of the whole mixture is reported; it drifts when several tasks overshoot); no other task;
* length distribution: the stats record the distribution asked; long-biased: each task's share of
  samples >= the threshold at least the asked fraction minus ``long_tol`` (the mixer's own warning
  margin) minus three binomial standard errors (small smoke mixtures); pool-native: that share
  equals the pool's own within three binomial standard errors
  plus ``abs_tol`` (no reweighting happened);
* mRoPE base: the run's saved config.json (``model.rope_theta``) and its final checkpoint's model
  config (``rope_theta``) both equal the claim.
A mismatch raises :class:`StudyCheckError` naming the variant, the file, the measured and claimed values.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

from megatron_vlm.study.ablations import Variant


class StudyCheckError(ValueError):
    """A built data set or run that does not match its variant's claim."""


@dataclass(frozen=True)
class Tolerances:
    abs_tol: float = 0.01  # on token shares and pool-native long shares, on top of granularity / sampling error
    long_tol: float = 0.05  # long-biased: measured >= asked - long_tol (the mixer warns below the same margin)


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def data_summary(stats: dict) -> dict:
    """The numbers a study reports per data variant: token shares, long shares (mixture and pool),
    samples, tokens, budget."""
    mixture = stats["mixture"]
    total = mixture["total"].get("total_tokens", 0)
    per_task = {}
    for task, row in mixture["per_task"].items():
        available = stats.get("available", {}).get("per_task", {}).get(task, {})
        per_task[task] = {"samples": row.get("samples", 0), "tokens": row.get("total_tokens", 0),
                          "token_share": _share(row.get("total_tokens", 0), total),
                          "max_tokens": int(round(row.get("token_range_k", [0, 0])[1] * 2**10)),
                          "long_share": row.get("share_at_least_threshold", 0.0),
                          "pool_long_share": available.get("share_at_least_threshold"),
                          "pool_samples": available.get("samples", 0)}
    config = stats.get("config", {})
    return {"distribution": config.get("distribution"), "long_threshold": config.get("long_threshold"),
            "long_fraction": config.get("long_fraction"), "short_ratio": config.get("short_ratio", 0.0),
            "budget_tokens": stats.get("budget_tokens"), "tokens": total,
            "samples": mixture["total"].get("samples", 0), "per_task": per_task}


def check_data(variant: Variant, stats: dict, where: str, tol: Tolerances = Tolerances()) -> dict:
    """Raise :class:`StudyCheckError` unless ``stats`` (MIX.stats.json at ``where``) is the data
    ``variant`` claims; returns :func:`data_summary` with the checks' tolerances."""
    summary = data_summary(stats)
    errors = []
    claimed = variant.data.shares()
    if summary["distribution"] != variant.data.distribution:
        errors.append(f"distribution {summary['distribution']!r}, claimed {variant.data.distribution!r}")
    if abs(float(summary["short_ratio"] or 0.0) - variant.data.short_ratio) > 1e-9:
        errors.append(f"mixed with --short-ratio {summary['short_ratio']}, claimed {variant.data.short_ratio}")
    total = summary["tokens"]
    if not total:
        errors.append("the mixture holds no tokens")
    for task in sorted(set(summary["per_task"]) - set(claimed)):
        errors.append(f"task {task!r} holds {100 * summary['per_task'][task]['token_share']:.1f}% of the tokens "
                      "but the variant claims none")
    checks = {}
    budget = int(summary["budget_tokens"] or total)
    for task, want in claimed.items():
        row = summary["per_task"].get(task)
        if row is None or not row["tokens"]:
            errors.append(f"task {task!r}: no samples, claimed {100 * want:.1f}% of the tokens")
            continue
        # the mixer fills each task to budget x share and stops at the first sample past it
        target = budget * want
        low, high = target - tol.abs_tol * budget, target + row["max_tokens"] + tol.abs_tol * budget
        checks[task] = {"claimed": want, "measured": row["token_share"], "tokens": row["tokens"],
                        "target_tokens": round(target), "allowed_tokens": [round(low), round(high)]}
        if not low <= row["tokens"] <= high:
            errors.append(f"task {task!r}: {100 * row['token_share']:.2f}% of the tokens, claimed {100 * want:.2f}% "
                          f"({row['tokens']:,} tokens for a target of {target:,.0f} = {100 * want:.2f}% of the "
                          f"{budget:,}-token budget; allowed {low:,.0f}-{high:,.0f}: up to one sample over, "
                          f"{100 * tol.abs_tol:g}% of the budget either way)")
    threshold = summary["long_threshold"]
    for task in variant.data.tasks:
        row = summary["per_task"].get(task)
        if row is None or not row["samples"]:
            continue
        measured = row["long_share"]
        if variant.data.distribution == "long-biased":
            asked = float(summary["long_fraction"])
            floor = asked - tol.long_tol - 3 * math.sqrt(asked * (1 - asked) / row["samples"])
            checks[f"{task} >= {threshold} tokens"] = {"claimed": f">= {floor:.3f}", "measured": measured}
            if measured < floor:
                errors.append(f"task {task!r}: {100 * measured:.1f}% of the samples have >= {threshold} tokens, "
                              f"long-biased claims >= {100 * floor:.1f}% (asked {100 * asked:.1f}%); the pool has "
                              f"{100 * (row['pool_long_share'] or 0):.1f}%: give longer samples (--long-vqa)")
        else:
            pool = row["pool_long_share"]
            if pool is None:
                continue
            n = row["samples"]
            allowed = tol.abs_tol + 3 * math.sqrt(max(pool * (1 - pool), 1e-12) / n)
            checks[f"{task} >= {threshold} tokens"] = {"claimed": pool, "measured": measured, "tolerance": allowed}
            if abs(measured - pool) > allowed:
                errors.append(f"task {task!r}: {100 * measured:.1f}% of the samples have >= {threshold} tokens, the "
                              f"pool has {100 * pool:.1f}% (pool-native claims no reweighting; tolerance "
                              f"{100 * allowed:.1f} points)")
    if errors:
        raise StudyCheckError(f"variant {variant.name}: the data in {where} does not match its claim: "
                              + "; ".join(errors))
    summary["checks"] = checks
    return summary


def _rope_of_model_config(config: dict) -> Optional[float]:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    text = config.get("text_config") or {}
    return float(text["rope_theta"]) if "rope_theta" in text else None


def check_rope(variant: Variant, run_dir: str, checkpoint: Optional[str]) -> dict:
    """The mRoPE base in the run's saved config.json and in its final checkpoint's model config."""
    found = {}
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise StudyCheckError(f"variant {variant.name}: {path} missing (the trainer writes it when training starts)")
    with open(path) as f:
        found[path] = (json.load(f).get("model") or {}).get("rope_theta")
    if checkpoint:
        path = os.path.join(checkpoint, "config.json")
        with open(path) as f:
            found[path] = _rope_of_model_config(json.load(f))
    for path, value in found.items():
        if value is None or not math.isclose(float(value), variant.rope_theta, rel_tol=1e-9):
            raise StudyCheckError(f"variant {variant.name}: {path} has rope_theta {value}, the variant claims "
                                  f"{variant.rope_theta:g}")
    return {"claimed": variant.rope_theta, "found": {p: float(v) for p, v in found.items()}}


__all__ = ["StudyCheckError", "Tolerances", "check_data", "check_rope", "data_summary"]
