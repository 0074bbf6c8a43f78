"""Predictive entropy and the per-token statistics of vocab-parallel logits.

Defined in docs/techniques.md: the predictive entropy under vocab-parallel logits (all-reduce `M = max z`
(MAX), `S = Σ exp(z − M)` (SUM), `U = Σ exp(z − M)·z` (SUM); `H = M + log S − U/S`), LCM
metric 2 (entropy variance EV), SCR metric 1 (sequence-level entropy statistics), HCMA
metric 1 (ranking by logits and by cosine). Entropies are in nats.

With TP, each rank holds a contiguous vocabulary shard of the logits (`[..., V_pad / t]`). The
functions below take the local shard and an optional process group; with `group=None` (or a group
of one) they are plain single-rank computations, so the same code is the reference in tests.
Padded vocabulary columns hold −1e30 (fp32) and drop out exactly: `exp(−1e30 − M) = 0`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from loom.model.parallel import comm


def _size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _size(group) > 1:
        comm.all_reduce(t, op=op, group=group)
    return t


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """`H = −Σ_v p(v) log p(v)` over the last dimension, from unsharded logits (LCM metric 2)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def msu_partials(local_logits: torch.Tensor, global_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's `S = Σ exp(z − M)` and `U = Σ exp(z − M)·z` given the global `M`."""
    z = local_logits.float()
    e = torch.exp(z - global_max.unsqueeze(-1))
    return e.sum(-1), (e * torch.where(e > 0, z, torch.zeros_like(z))).sum(-1)


def entropy_from_msu(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`H = M + log S − U/S`."""
    return m + torch.log(s) - u / s


def vocab_parallel_entropy(local_logits: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Predictive entropy from vocab-parallel logits, with the reductions of vocab-parallel cross-entropy.

    Collective over `group` (the TP group): every rank gets the same `[...]` entropies."""
    m = _all_reduce(local_logits.float().amax(-1), dist.ReduceOp.MAX, group)
    s, u = msu_partials(local_logits, m)
    su = _all_reduce(torch.stack([s, u]), dist.ReduceOp.SUM, group)
    return entropy_from_msu(m, su[0], su[1])


def vocab_parallel_token_stats(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    column_scale: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Per-position statistics of vocab-parallel logits `[..., V_local]` against `targets [...]`.

    * `nll = M + log S − z_y` (the teacher-forced NLL, the reductions of vocab-parallel
      cross-entropy), `entropy = M + log S − U/S`;
    * `rank`: how many vocabulary entries have a strictly larger logit than the target (0 means a
      top-1 hit; `rank < k` is a top-k hit, CMR metric 2, HCMA metric 1);
    * `argmax`: the global arg-max id (lowest id on ties), for agreement and greedy decoding;
    * `rank_cos` (when `column_scale` is given): the rank under `z_v · column_scale_v`; with
      `column_scale = 1/‖W_out,v‖` this is the cosine ranking of HCMA metric 1 (the factor
      `1/‖h_t‖` is the same for every v and does not change ranks).

    Collective over `group`; all ranks return the same tensors.
    """
    z = local_logits.float()
    local = z.shape[-1]
    targets = targets.long()
    in_shard = (targets >= vocab_start) & (targets < vocab_start + local)
    idx = (targets - vocab_start).clamp(0, local - 1).unsqueeze(-1)
    m = _all_reduce(z.amax(-1), dist.ReduceOp.MAX, group)
    s, u = msu_partials(z, m)
    z_y = torch.where(in_shard, z.gather(-1, idx).squeeze(-1), torch.zeros_like(m))
    parts = [s, u, z_y]
    if column_scale is not None:
        zc = z * column_scale.float()
        parts.append(torch.where(in_shard, zc.gather(-1, idx).squeeze(-1), torch.zeros_like(m)))
    summed = _all_reduce(torch.stack(parts), dist.ReduceOp.SUM, group)  # only the owner adds z_y
    s, u, z_y = summed[0], summed[1], summed[2]
    out = {"nll": m + torch.log(s) - z_y, "entropy": entropy_from_msu(m, s, u)}
    counts = [(z > z_y.unsqueeze(-1)).sum(-1).float()]
    if column_scale is not None:
        counts.append((zc > summed[3].unsqueeze(-1)).sum(-1).float())
    ranks = _all_reduce(torch.stack(counts), dist.ReduceOp.SUM, group).long()
    out["rank"] = ranks[0]
    if column_scale is not None:
        out["rank_cos"] = ranks[1]
    out["argmax"] = vocab_parallel_argmax(z, vocab_start, group)
    return out


def vocab_parallel_argmax(
    local_logits: torch.Tensor, vocab_start: int, group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """Global arg-max id of vocab-parallel logits (the lowest id among equal maxima)."""
    z = local_logits.float()
    best, arg = z.max(-1)
    if _size(group) == 1:
        return arg + vocab_start
    pairs = torch.stack([best, (arg + vocab_start).float()])
    gathered = comm.all_gather(pairs, group=group)
    values = torch.stack([g[0] for g in gathered])  # [n, ...]
    ids = torch.stack([g[1] for g in gathered])
    top = values.max(0).values
    ids = torch.where(values == top.unsqueeze(0), ids, torch.full_like(ids, float("inf")))
    return ids.min(0).values.long()


def entropy_variance(per_prompt_entropies: Sequence[torch.Tensor]) -> float:
    """EV = `Var_t(H_t)` per prompt (population variance over generated steps), averaged over
    prompts (LCM metric 2)."""
    values = [
        float(torch.as_tensor(h, dtype=torch.float64).var(unbiased=False))
        for h in per_prompt_entropies
        if torch.as_tensor(h).numel() > 0
    ]
    return sum(values) / len(values) if values else float("nan")


def sequence_entropy_stats(per_sequence_entropies: Sequence[torch.Tensor]) -> dict:
    """`H̄ = mean_t H_t` per sequence (teacher-forced); returns the mean and the population
    variance of `H̄` over sequences (SCR metric 1)."""
    means = torch.tensor(
        [
            float(torch.as_tensor(h, dtype=torch.float64).mean())
            for h in per_sequence_entropies
            if torch.as_tensor(h).numel() > 0
        ],
        dtype=torch.float64,
    )
    if means.numel() == 0:
        return {"mean": float("nan"), "var": float("nan"), "sequences": 0}
    return {"mean": float(means.mean()), "var": float(means.var(unbiased=False)), "sequences": int(means.numel())}
