"""The study's statistics: per-metric summaries over seeds, Welch and paired (by seed) t-tests against the
baseline, the paired difference with its 95 % confidence interval, the Holm and Benjamini-Hochberg
corrections for testing many metrics at once, and the helps / no effect / hurts verdict of a claim."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence


def values_by_seed(data: dict, arm: str, key: str) -> Dict[Any, float]:
    """{seed: finite value of metric `key`} of one arm in `report.collect`'s data."""
    out = {}
    for seed, item in data.get(arm, {}).items():
        v = item.get("metrics", {}).get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            out[seed] = float(v)
    return out


def values(data: dict, arm: str, key: str) -> List[float]:
    return list(values_by_seed(data, arm, key).values())


def summarise(values: List[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof = 1; 0 for one value) and count."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def welch(a: List[float], b: List[float]) -> float:
    """Two-sided Welch t-test p-value of `a` against `b` (NaN when undefined)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    from scipy import stats

    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _paired_diffs(a: Dict[Any, float], b: Dict[Any, float]) -> List[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b), key=str)]


def paired(a: Dict[Any, float], b: Dict[Any, float]) -> float:
    """Two-sided paired t-test p-value over the seeds both arms have (NaN with fewer than 2).

    Every arm trains with the same seeds (weights, data order), so a seed's baseline is the matched
    control of that seed's arm; pairing removes the between-seed spread from the comparison."""
    diffs = _paired_diffs(a, b)
    if len(diffs) < 2:
        return float("nan")
    from scipy import stats

    if max(diffs) == min(diffs):  # no spread: identical runs (1) or an undefined test (a discrete metric's step)
        return 1.0 if diffs[0] == 0 else float("nan")
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def paired_difference(a: Dict[Any, float], b: Dict[Any, float], level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of `a − b` over the shared seeds and its `level` confidence interval (Student t, n − 1 degrees of
    freedom): (mean, low, high, n). With one seed the interval is undefined (NaN bounds)."""
    diffs = _paired_diffs(a, b)
    mean, std, n = summarise(diffs)
    if n < 2:
        return mean, float("nan"), float("nan"), n
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half, n


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error rate), in the input order. NaN stays NaN and
    does not count toward the number of tests."""
    valid = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(valid)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> List[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order; NaN stays NaN."""
    valid = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(valid)
    out = [float("nan")] * len(pvalues)
    running = 1.0
    for rank in range(m - 1, -1, -1):
        p, i = valid[rank]
        running = min(running, m * p / (rank + 1))
        out[i] = min(1.0, running)
    return out


def verdict(difference: float, adjusted_p: Optional[float], better: str, alpha: float) -> str:
    """`helps` / `hurts` when the corrected p-value is below `alpha` and the paired difference (arm − baseline)
    goes the claim's way or against it; `differs` for a metric without a better direction; else `no effect`
    (not distinguishable from the baseline at this many seeds, which is not evidence of no effect)."""
    if adjusted_p is None or not math.isfinite(adjusted_p) or not math.isfinite(difference):
        return "untested"
    if adjusted_p >= alpha:
        return "no effect"
    if better not in ("lower", "higher"):
        return "differs"
    improves = difference < 0 if better == "lower" else difference > 0
    return "helps" if improves else "hurts"
