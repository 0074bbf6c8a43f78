"""Embedding-geometry diagnostics and rare-token retrieval@k.

Defined in docs/techniques.md: HCMA metric 1 (rare-token retrieval@k per training-frequency bucket, by
logits and by cosine) and HCMA metric 4 (silhouette score (cosine) of the fine clusters; kNN@10
overlap with the table before alignment, `mean_v |kNN₁₀ before ∩ kNN₁₀ after| / 10`; fraction of
tokens in low-density regions, `ρ_v < ρ_med / π_max` with the kNN density of HCMA's refresh).
Tables are `[V, d]` with real rows only (no TP padding rows).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from loom.techniques.metrics.recall import accuracy_by_bucket


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x).double(), dim=-1)


def _chunks(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def silhouette_cosine(x: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Mean silhouette `s_i = (b_i − a_i) / max(a_i, b_i)` with the cosine distance `1 − cos`
    (HCMA metric 4): `a_i` the mean distance to the other members of i's cluster, `b_i` the
    smallest mean distance to another cluster. Members of singleton clusters score 0 (the usual
    convention). Exact, computed in row chunks; NaN with fewer than two clusters."""
    u = _unit(x)
    labels = torch.as_tensor(labels).long()
    uniq, lab = torch.unique(labels, return_inverse=True)
    k = uniq.numel()
    if k < 2:
        return float("nan")
    onehot = F.one_hot(lab, k).double()
    sizes = onehot.sum(0)
    scores = torch.empty(u.shape[0], dtype=torch.float64)
    for rows in _chunks(u.shape[0], chunk):
        dist = 1.0 - u[rows] @ u.T  # [c, N]
        sums = dist @ onehot  # [c, K]
        own = lab[rows]
        own_size = sizes[own]
        a = sums.gather(1, own[:, None]).squeeze(1) / (own_size - 1).clamp_min(1)
        mean_other = sums / sizes[None, :]
        mean_other.scatter_(1, own[:, None], float("inf"))
        b = mean_other.min(1).values
        s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
        scores[rows] = torch.where(own_size > 1, s, torch.zeros_like(s))
    return float(scores.mean())


def knn_indices(x: torch.Tensor, k: int = 10, chunk: int = 1024) -> torch.Tensor:
    """The `k` nearest other rows of each row by cosine `[V, k]` (self excluded)."""
    u = _unit(x)
    out = torch.empty(u.shape[0], k, dtype=torch.long)
    for rows in _chunks(u.shape[0], chunk):
        sim = u[rows] @ u.T
        local = torch.arange(sim.shape[0])
        sim[local, rows.start + local] = -float("inf")
        out[rows] = sim.topk(k, dim=1).indices
    return out


def knn_overlap(before: torch.Tensor, after: torch.Tensor, k: int = 10) -> float:
    """`mean_v |kNN_k before ∩ kNN_k after| / k` (HCMA metric 4, k = 10): how much of the
    table's neighbourhood structure is kept. 1.0 for identical tables."""
    a, b = knn_indices(before, k), knn_indices(after, k)
    hits = (a[:, :, None] == b[:, None, :]).any(-1).sum(1).double()
    return float((hits / k).mean())


def knn_density(y: torch.Tensor, knn: int = 16, chunk: int = 1024) -> torch.Tensor:
    """`ρ_v = 1 / max(mean_{u ∈ kNN(v)} (1 − cos(Y_v, Y_u)), 1e-6)` (HCMA's refresh, self excluded)."""
    u = _unit(y)
    rho = torch.empty(u.shape[0], dtype=torch.float64)
    for rows in _chunks(u.shape[0], chunk):
        sim = u[rows] @ u.T
        local = torch.arange(sim.shape[0])
        sim[local, rows.start + local] = -2.0
        dist = 1.0 - sim.topk(knn, dim=1).values
        rho[rows] = 1.0 / dist.mean(1).clamp_min(1e-6)
    return rho


def low_density_fraction(
    table: torch.Tensor, knn: int = 16, pi_max: float = 4.0, projection: Optional[torch.Tensor] = None
) -> float:
    """Fraction of rows with `ρ_v < ρ_med / π_max`, i.e. where HCMA's weight `π_v` hits its cap
    (HCMA metric 4, HCMA's refresh). With `projection` (HCMA's random `R [d, p]`) the density is
    taken on `Y = normalize(normalize(E) R)` exactly as HCMA's refresh does; else on `normalize(E)`.
    `ρ_med` is the lower median, as `torch.median`."""
    y = _unit(table)
    if projection is not None:
        y = _unit(y @ torch.as_tensor(projection).double())
    rho = knn_density(y, knn)
    return float((rho < rho.median() / pi_max).double().mean())


def retrieval_at_k(ranks, target_frequency, ks: Sequence[int] = (1, 10), mask=None) -> dict:
    """Rare-token retrieval@k (HCMA metric 1): top-k accuracy of the correct next token per
    training-frequency bucket, given the rank of the target under the chosen scoring (logits
    `W_out·h_t`, or cosine between `h_t` and the rows of `W_out`)."""
    return accuracy_by_bucket(ranks, target_frequency, ks, mask)
