"""Perplexity family: teacher-forced NLL bookkeeping, held-out perplexity, perplexity fluctuation
(PPL-F) and its coefficient of variation, and NLL-difference "gains".

Defined in docs/techniques.md: the teacher-forced NLL `ℓ_t = −log p(x_t | x_<t)`, LCM metric 1 (PPL-F),
SCR metric 4 (context-persistence gain), CMR metric 4 (multi-turn context-utilisation gain),
SCA metrics 3–4 and HCMA metric 5 (perplexity, rare-token NLL). Statistics are population
statistics (ddof = 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def perplexity(mean_nll: float) -> float:
    """`exp(mean NLL)` (SCA metric 4, HCMA metric 5); capped at exp(50) so it stays finite."""
    return math.exp(min(float(mean_nll), 50.0))


def mean_nll(nll_sum: float, tokens: int) -> float:
    """Token-weighted mean NLL from a sum and a count (the held-out loss)."""
    return float(nll_sum) / tokens if tokens else float("nan")


def window_log_ppl(nll: torch.Tensor, window: int = 128, stride: int = 64) -> torch.Tensor:
    """`log PPL_w = mean of ℓ over window w` for windows of `window` tokens every `stride` tokens
    (LCM metric 1). Only full windows count; a document shorter than `window` has none."""
    nll = torch.as_tensor(nll, dtype=torch.float64).flatten()
    if nll.numel() < window:
        return nll.new_zeros(0)
    return nll.unfold(0, window, stride).mean(1)


def ppl_fluctuation(documents_nll: Sequence[torch.Tensor], window: int = 128, stride: int = 64) -> dict:
    """PPL-F and its CV (LCM metric 1).

    Per document: `PPL-F = std_w(log PPL_w)` and `CV = std_w(PPL_w) / mean_w(PPL_w)` (population
    std). Both are averaged over documents with at least two full windows; `documents` says how many.
    """
    fluct, cv = [], []
    for nll in documents_nll:
        logs = window_log_ppl(nll, window, stride)
        if logs.numel() < 2:
            continue
        fluct.append(float(logs.std(unbiased=False)))
        ppl = logs.exp()
        cv.append(float(ppl.std(unbiased=False) / ppl.mean()))
    if not fluct:
        return {"ppl_f": float("nan"), "ppl_cv": float("nan"), "documents": 0}
    return {"ppl_f": sum(fluct) / len(fluct), "ppl_cv": sum(cv) / len(cv), "documents": len(fluct)}


def plan_windows(n_inputs: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Sliding windows that score each of `n_inputs` positions exactly once (teacher-forced
    NLL on documents longer than the model's context).

    Returns `(start, keep_from)` pairs: the window covers positions `[start, start + window)` and
    scores positions `start + keep_from ..`. The first window scores everything; later windows
    advance by `stride` and score only positions not scored before, so every scored position sees
    at least `window − stride` earlier positions (or all of them near the document start). The
    last window ends exactly at `n_inputs`. Needs `n_inputs >= window`.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride} window={window}")
    if n_inputs < window:
        raise ValueError(f"{n_inputs} positions are fewer than one window of {window}")
    plan, scored_until, start = [(0, 0)], window, 0
    while scored_until < n_inputs:
        start = min(start + stride, n_inputs - window)
        plan.append((start, scored_until - start))
        scored_until = start + window
    return plan


def nll_gain(nll_without: torch.Tensor, nll_with: torch.Tensor) -> float:
    """`Gain = mean NLL(target | less context) − mean NLL(target | more context)` over the same
    target tokens: SCR metric 4 (second half without vs with the first half) and CMR metric 4
    (final turn given the last turn only vs the full history). Higher means more context is used."""
    a = torch.as_tensor(nll_without, dtype=torch.float64).flatten()
    b = torch.as_tensor(nll_with, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"gains compare the same targets: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(a.mean() - b.mean())


def restricted_nll(nll: torch.Tensor, target_frequency: torch.Tensor, max_frequency: int = 100) -> dict:
    """Mean NLL over the target tokens whose training frequency is ≤ `max_frequency` (SCA
    metric 3, rare-word NLL); `tokens` is how many targets qualified."""
    nll = torch.as_tensor(nll, dtype=torch.float64).flatten()
    freq = torch.as_tensor(target_frequency).flatten()
    mask = freq <= max_frequency
    count = int(mask.sum())
    return {"nll": float(nll[mask].mean()) if count else float("nan"), "tokens": count}
