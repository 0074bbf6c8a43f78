"""Learning rate as a pure function of the step (so a resumed run needs no scheduler state)."""

from __future__ import annotations

import math


def learning_rate(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine"
) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine/linear decay to `min_lr` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
