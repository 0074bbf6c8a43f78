"""Adversarial robustness: token-level perturbation (ΔNLL on the unperturbed continuation, top-1
agreement) and the one-step L2 fast-gradient perturbation of the input embeddings.

Defined in docs/techniques.md: HCMA metric 2. Token level: perturb 5 % of the context tokens (here by
nearest-embedding substitution) and report `ΔNLL = mean NLL(continuation | perturbed context) −
mean NLL(continuation | clean context)` and the agreement of clean and perturbed top-1
predictions on the continuation. Embedding space: `e'_t = e_t + ε_t · g_t / ‖g_t‖₂` with
`g_t = ∇_{e_t} NLL` and `ε_t = 0.01·‖e_t‖₂`; report the drop in next-token top-1 accuracy.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
import torch.nn.functional as F


def nearest_neighbours(table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of the `[V, d]` table, the index of its nearest other row by cosine."""
    u = F.normalize(table.double(), dim=-1)
    out = torch.empty(u.shape[0], dtype=torch.long)
    for start in range(0, u.shape[0], chunk):
        sim = u[start : start + chunk] @ u.T
        local = torch.arange(sim.shape[0])
        sim[local, start + local] = -float("inf")
        out[start : start + chunk] = sim.argmax(1)
    return out


def substitute_tokens(
    context: Sequence[int], neighbours: torch.Tensor, fraction: float = 0.05, seed: int = 0, protect: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """Replace `round(fraction · len)` (at least one) context tokens, at positions drawn with a
    generator seeded `seed`, by their nearest-embedding neighbour. Positions listed in `protect`
    (e.g. a leading EOS) are never chosen. Returns (perturbed context, changed positions)."""
    context = list(context)
    candidates = [i for i in range(len(context)) if i not in set(protect)]
    n = max(1, round(fraction * len(candidates)))
    rng = random.Random(seed)
    positions = sorted(rng.sample(candidates, min(n, len(candidates))))
    for i in positions:
        context[i] = int(neighbours[context[i]])
    return context, positions


def delta_nll(nll_clean: torch.Tensor, nll_perturbed: torch.Tensor) -> float:
    """`mean NLL(perturbed) − mean NLL(clean)` over the same continuation tokens."""
    return float(
        torch.as_tensor(nll_perturbed, dtype=torch.float64).mean()
        - torch.as_tensor(nll_clean, dtype=torch.float64).mean()
    )


def top1_agreement(pred_clean: torch.Tensor, pred_perturbed: torch.Tensor) -> float:
    """Fraction of positions where the clean and perturbed arg-max predictions agree."""
    a, b = torch.as_tensor(pred_clean), torch.as_tensor(pred_perturbed)
    return float((a == b).double().mean())


def fgsm_l2(embeddings: torch.Tensor, grad: torch.Tensor, eps_ratio: float = 0.01) -> torch.Tensor:
    """`e'_t = e_t + ε_t · g_t / ‖g_t‖₂`, `ε_t = eps_ratio · ‖e_t‖₂`, per token over the last
    dimension; tokens with a zero gradient are left unchanged."""
    e, g = embeddings.float(), grad.float()
    g_norm = g.norm(dim=-1, keepdim=True)
    step = torch.where(g_norm > 0, g / g_norm.clamp_min(1e-30), torch.zeros_like(g))
    return (e + eps_ratio * e.norm(dim=-1, keepdim=True) * step).to(embeddings.dtype)


def accuracy_drop(correct_clean: torch.Tensor, correct_adversarial: torch.Tensor) -> dict:
    """Top-1 accuracy before and after the perturbation and their difference (clean − adversarial)."""
    clean = float(torch.as_tensor(correct_clean, dtype=torch.float64).mean())
    adv = float(torch.as_tensor(correct_adversarial, dtype=torch.float64).mean())
    return {"acc_clean": clean, "acc_adversarial": adv, "drop": clean - adv}
