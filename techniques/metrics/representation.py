"""Hidden-state metrics: latent drift, representation variability, effective rank, anisotropy,
the chunk coherence score and margin, and rare-token self-consistency.

Defined in docs/techniques.md: LCM metric 4 (latent drift), SCR metric 2 (representation variability),
SCA metric 1 (coherence score, CohMargin), SCA metric 2 (effective rank, anisotropy) and
SCA metric 3 (self-consistency). Hidden states are `[T, d]` per document (one row per token);
`h^ℓ` is the residual stream at the output of block ℓ, `h^0` the embedding output.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float64)


def latent_drift(h: torch.Tensor, start: Optional[torch.Tensor] = None) -> float:
    """Mean over positions t ≥ 1 of `1 − cos(h_t, h_{t−1})`, excluding document starts (LCM
    metric 4; `h` is `h^L`, before the final norm). `start[t]` marks a document start. One document's
    value; average it over documents. NaN when no position qualifies."""
    h = _f64(h)
    if h.shape[0] < 2:
        return float("nan")
    drift = 1.0 - F.cosine_similarity(h[1:], h[:-1], dim=-1)
    keep = torch.ones_like(drift, dtype=torch.bool) if start is None else ~torch.as_tensor(start, dtype=torch.bool)[1:]
    return float(drift[keep].mean()) if keep.any() else float("nan")


def representation_variability(h: torch.Tensor) -> float:
    """`mean_t ‖h_t − mean_doc(h)‖² / mean_t ‖h_t‖²` for one layer and one document (SCR
    metric 2); average it over documents."""
    h = _f64(h)
    centred = h - h.mean(0, keepdim=True)
    return float(centred.pow(2).sum(-1).mean() / h.pow(2).sum(-1).mean())


def effective_rank(x: torch.Tensor) -> float:
    """`erank = exp(H(σ̂))` of the centred `[N, d]` matrix, `σ̂` its singular values normalised to
    sum to 1 and `H` the Shannon entropy (SCA metric 2). 1 for a rank-1 matrix, `r` for `r`
    equal singular values."""
    x = _f64(x)
    x = x - x.mean(0, keepdim=True)
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def anisotropy(x: torch.Tensor, pairs: int = 4096, seed: int = 0) -> float:
    """Mean cosine between the hidden states of random token pairs `i ≠ j` (SCA metric 2),
    `pairs` pairs drawn with a generator seeded `seed`."""
    x = _f64(x)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (pairs,), generator=g)
    j = (i + torch.randint(1, n, (pairs,), generator=g)) % n  # never i
    return float(F.cosine_similarity(x[i], x[j], dim=-1).mean())


def chunk_means(h: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean-pooled states `e_k` of the full `chunk`-token chunks of one document (SCA metric 1)."""
    h = _f64(h)
    k = h.shape[0] // chunk
    return h[: k * chunk].reshape(k, chunk, -1).mean(1)


def coherence(chunks: torch.Tensor) -> float:
    """`Coh = mean_k cos(e_k, e_{k+1})` over adjacent chunks of one document, in [−1, 1] (SCA
    metric 1); NaN with fewer than two chunks."""
    e = _f64(chunks)
    if e.shape[0] < 2:
        return float("nan")
    return float(F.cosine_similarity(e[1:], e[:-1], dim=-1).mean())


def coherence_report(documents_chunks: Sequence[torch.Tensor], groups: Optional[Sequence[int]] = None) -> dict:
    """Coherence over documents (SCA metric 1): the mean `Coh`, `CohMargin = Coh − mean cos
    between chunks of different documents` (averaged over documents), and the distribution of
    `Coh` over documents (min, quartiles, max). Documents with fewer than two chunks are skipped.
    `groups` names the source document of each entry when entries are segments of longer
    documents: chunks of the same source are never counted as "different documents"."""
    groups = list(range(len(documents_chunks))) if groups is None else list(groups)
    kept = [(_f64(c), g) for c, g in zip(documents_chunks, groups) if _f64(c).shape[0] >= 2]
    docs = [c for c, _ in kept]
    if not docs:
        return {"coh": float("nan"), "margin": float("nan"), "documents": 0}
    coh = torch.tensor([coherence(c) for c in docs], dtype=torch.float64)
    cross = float("nan")
    owner = torch.cat([torch.full((c.shape[0],), g) for c, g in kept])
    different = owner[:, None] != owner[None, :]
    if different.any():
        allc = F.normalize(torch.cat(docs), dim=-1)
        sim = allc @ allc.T
        cross = float(sim[different].mean())
    q = torch.quantile(coh, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return {
        "coh": float(coh.mean()),
        "margin": float(coh.mean()) - cross,
        "cross_doc_cos": cross,
        "documents": len(docs),
        "coh_min": float(q[0]),
        "coh_q25": float(q[1]),
        "coh_median": float(q[2]),
        "coh_q75": float(q[3]),
        "coh_max": float(q[4]),
    }


def self_consistency(
    states: torch.Tensor,
    token_ids: Sequence[int],
    doc_ids: Sequence[int],
    baseline_cos: float,
    max_pairs_per_token: int = 256,
) -> dict:
    """Mean cosine between the contextual states of the same (rare) token in different documents,
    minus the mean cosine of random token pairs `baseline_cos` (SCA metric 3). The pair cosines
    are averaged per token first (at most `max_pairs_per_token` pairs each, in a fixed order), then
    over tokens, so frequent-among-the-rare tokens do not dominate. `states` are the rows for the
    occurrences listed in `token_ids` / `doc_ids` (pass only the rare tokens' occurrences)."""
    x = F.normalize(_f64(states), dim=-1)
    by_token: dict[int, list[int]] = defaultdict(list)
    for row, tok in enumerate(token_ids):
        by_token[int(tok)].append(row)
    per_token = []
    for rows in by_token.values():
        pairs = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :] if doc_ids[a] != doc_ids[b]]
        if not pairs:
            continue
        pairs = pairs[:max_pairs_per_token]
        a = torch.tensor([p[0] for p in pairs])
        b = torch.tensor([p[1] for p in pairs])
        per_token.append(float((x[a] * x[b]).sum(-1).mean()))
    if not per_token:
        return {"same_token_cos": float("nan"), "self_consistency": float("nan"), "tokens": 0}
    same = sum(per_token) / len(per_token)
    return {"same_token_cos": same, "self_consistency": same - baseline_cos, "tokens": len(per_token)}
