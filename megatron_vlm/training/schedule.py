"""Learning-rate schedule of the recipe: linear warmup over the first 10% of steps, then cosine decay
from the peak to the floor at the last step."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, peak: float, floor: float, warmup_fraction: float) -> float:
    """LR for optimizer step ``step`` (0-based): step 0 of warmup already has a non-zero LR."""
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
