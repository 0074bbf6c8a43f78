"""Optimisation smoothness and overhead, from a run's logged training scalars.

Defined in docs/techniques.md: LCM metric 5 (coefficient of variation of the global grad-norm over a
sliding window of 100 steps; number of spikes, a spike being a step whose grad-norm exceeds 3×
the running median over the previous 100 steps) and the overhead metrics LCM metric 6, SCR
metric 5, CMR metric 5, SCA's claims and HCMA metric 5 (tokens/s, step time, peak memory, inference
ms/token against the baseline).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def grad_norm_cv(values: Sequence[float], window: int = 100) -> float:
    """Mean over all full sliding windows of `std/mean` (population std) of the grad-norm. A run
    shorter than one window gives the CV of the whole series."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan")
    if x.size <= window:
        return float(x.std() / x.mean())
    windows = np.lib.stride_tricks.sliding_window_view(x, window)
    return float((windows.std(axis=1) / windows.mean(axis=1)).mean())


def grad_norm_spikes(values: Sequence[float], factor: float = 3.0, window: int = 100, min_history: int = 10) -> int:
    """Steps whose grad-norm is greater than `factor` × the median of the previous `window` steps
    (at least `min_history` previous steps are needed before a step can count)."""
    x = np.asarray(values, dtype=np.float64)
    spikes = 0
    for i in range(min_history, x.size):
        history = x[max(0, i - window) : i]
        history = history[np.isfinite(history)]
        if history.size >= min_history and np.isfinite(x[i]) and x[i] > factor * np.median(history):
            spikes += 1
    return spikes
