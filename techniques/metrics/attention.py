"""Attention-head deviation: cross-layer AHD and within-layer head dispersion, via the
Jensen–Shannon divergence, plus the eager attention probabilities they need.

Defined in docs/techniques.md: SCR metric 3. `A^{ℓ,h}_{t,:}` is the attention distribution of head h in
layer ℓ for query t, `Ā^ℓ_t = mean_h A^{ℓ,h}_{t,:}`;
`AHD_ℓ = mean_t JS(Ā^ℓ_t ‖ Ā^{ℓ+1}_t)`, `D_ℓ = mean_{h,t} JS(A^{ℓ,h}_t ‖ Ā^ℓ_t)`, natural log.
Computed on a subsample of queries with eager attention (flash attention never materialises the
probabilities). Under TP each rank holds `n_h / t` heads: `head_sum` and `dispersion_sum` give the
per-rank partial sums that are all-reduced over the TP group.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def js_divergence(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`JS(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)`, `m = ½(p + q)`, natural log, `0·log 0 = 0`; in
    [0, log 2]."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(
            a > 0, a * (torch.log(a.clamp_min(1e-300)) - torch.log(b.clamp_min(1e-300))), torch.zeros_like(a)
        ).sum(dim)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0.0)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of the selected queries: `q [b, h, s, e]`, `k [b, h, s, e]` (keys
    already expanded to the query heads), `query_positions [Q]` → `[b, h, Q, s]` (fp32; keys after
    a query get probability 0). The same scores as `scaled_dot_product_attention(is_causal=True)`."""
    qs = q[:, :, query_positions].float()
    scores = qs @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    keys = torch.arange(k.shape[2], device=k.device)
    scores = scores.masked_fill(keys[None, :] > query_positions[:, None].to(k.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def head_sum(attn: torch.Tensor) -> torch.Tensor:
    """Sum over this rank's heads of `A [b, h, Q, s]` → `[b, Q, s]`; all-reduce it over TP and
    divide by the total head count to get `Ā`."""
    return attn.double().sum(1)


def dispersion_sum(attn: torch.Tensor, mean_attn: torch.Tensor) -> torch.Tensor:
    """`Σ_{h,b,t} JS(A^h_t ‖ Ā_t)` over this rank's heads (a scalar partial sum for `D_ℓ`)."""
    return js_divergence(attn.double(), mean_attn.double().unsqueeze(1)).sum()


def head_dispersion(attn: torch.Tensor) -> float:
    """`D = mean_{h,t} JS(A^h_t ‖ Ā_t)` from all heads `A [b, h, Q, s]` (single rank)."""
    mean_attn = attn.double().mean(1)
    return float(dispersion_sum(attn, mean_attn) / (attn.shape[0] * attn.shape[1] * attn.shape[2]))


def cross_layer_ahd(mean_attn_per_layer: Sequence[torch.Tensor]) -> list[float]:
    """`AHD_ℓ = mean_t JS(Ā^ℓ_t ‖ Ā^{ℓ+1}_t)` for consecutive layers (the same queries in every
    layer): `L` head-averaged maps `[..., Q, s]` give `L − 1` values."""
    return [float(js_divergence(a, b).mean()) for a, b in zip(mean_attn_per_layer[:-1], mean_attn_per_layer[1:])]
