"""Which weights tensor parallelism splits, and along which dimension: the one table used to tag and
initialise them (`model/init.py`), to merge TP shards into full weights (`model/parallel/consolidate.py`,
`launch/checkpoint/read_deepspeed.py`) and to cut full weights for a TP rank again (start points,
resharding). Names are TP=1 parameter names; every weight not in the table is replicated.

Vocabulary weights have the padded vocabulary as rows (padded to a multiple of TP for the split); full,
layout-free weights keep only the real `vocab_size` rows, and the padding rows are zeros that the loss
masks out, so cutting and re-padding them loses nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SplitRule:
    pattern: str
    """Regular expression over the TP=1 parameter name (matched in full)."""
    dim: int
    """Dimension split into contiguous equal parts, one per TP rank (0: output rows, 1: input columns)."""
    vocab: bool
    """The rows are the (padded) vocabulary."""
    layer: str
    """The megatron-core layer that holds the weight."""


SPLIT_RULES: tuple[SplitRule, ...] = (
    SplitRule(r"embedding\.weight", 0, True, "VocabParallelEmbedding"),
    SplitRule(r"output_layer\.weight", 0, True, "ColumnParallelLinear"),
    # whole key/value groups per rank: rows are [q heads of g, k_g, v_g] for each group g
    SplitRule(r"layers\.\d+\.attention\.qkv\.weight", 0, False, "ColumnParallelLinear"),
    # interleaved gate_0, up_0, gate_1, … rows, so each rank keeps gate rows beside their up rows
    SplitRule(r"layers\.\d+\.mlp\.gate_up\.weight", 0, False, "ColumnParallelLinear"),
    SplitRule(r"layers\.\d+\.attention\.proj\.weight", 1, False, "RowParallelLinear"),
    SplitRule(r"layers\.\d+\.mlp\.down\.weight", 1, False, "RowParallelLinear"),
)
_COMPILED = [(re.compile(rule.pattern), rule) for rule in SPLIT_RULES]


def rule_for(name: str) -> SplitRule | None:
    for regex, rule in _COMPILED:
        if regex.fullmatch(name):
            return rule
    return None


def partition_dim(name: str) -> int | None:
    """The split dimension of a weight by its TP=1 name, None if it is replicated."""
    rule = rule_for(name)
    return None if rule is None else rule.dim


def is_vocab_weight(name: str) -> bool:
    rule = rule_for(name)
    return rule is not None and rule.vocab


def mark_tensor_parallel(module: nn.Module) -> None:
    """Tag the split weights as megatron-core does when it initialises them itself (Loom initialises
    them afterwards): DeepSpeed's gradient norm and Loom's consolidation read these tags."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, param in module.named_parameters():
        rule = rule_for(name)
        if rule is not None:
            set_tensor_model_parallel_attributes(param, True, rule.dim, 1)


def fit_vocab_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad (or cut the padding from) the vocabulary rows of a full vocabulary weight."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] < rows:
        pad = torch.zeros((rows - full.shape[0],) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
        return torch.cat([full, pad])
    return full[:rows]


def local_slice(name: str, full: torch.Tensor, local_shape: tuple[int, ...], tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's piece of a full (TP=1, unpadded-vocabulary) tensor for a parameter whose local
    shape is `local_shape`. Raises ValueError when the shapes do not fit."""
    rule = rule_for(name)
    full_shape = list(local_shape)
    if rule is not None and tp > 1:
        full_shape[rule.dim] *= tp
    if rule is not None and rule.vocab:
        full = fit_vocab_rows(full, full_shape[0])
    if list(full.shape) != full_shape:
        where = f"{tp} × {tuple(local_shape)} (dim {rule.dim})" if (rule is not None and tp > 1) else str(full_shape)
        raise ValueError(f"{name}: full shape {tuple(full.shape)} does not fit {where}")
    if rule is None or tp == 1:
        return full
    return full.chunk(tp, dim=rule.dim)[tp_rank]
