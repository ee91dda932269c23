"""Learning-rate schedules: warm-up, then constant, cosine or linear decay (pure; no torch state to checkpoint).

The lr of an update is a function of the phase's update index alone, so the training-state checkpoint's phase
step is the whole schedule state: a resumed run gives every later update the lr the uninterrupted run gave it.

The formulas are Hugging Face transformers' get_{constant,cosine,linear}_schedule_with_warmup (what the paper's
released scripts call), with update k = 0, 1, ... of a phase of `total` updates and `warmup` warm-up updates:

    k < warmup:   lr * k / warmup                      (the first update of a warm-up has lr 0, as there)
    constant:     lr
    cosine:       lr * 0.5 * (1 + cos(pi * (k - warmup) / (total - warmup)))
    linear:       lr * (total - k) / (total - warmup)
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine", "linear"]


def lr_at(step: int, base_lr: float, schedule: str, warmup: int, total: int) -> float:
    """The lr of update `step` (0-based) of a phase."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    decay = max(total - warmup, 1)
    progress = min((step - warmup) / decay, 1.0)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r} (use constant, cosine or linear)")
