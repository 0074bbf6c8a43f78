"""Initial weights that are identical for every TP/PP layout.

Each tensor-parallel weight is drawn in full from a generator seeded by (seed, parameter name) and
this rank keeps its slice, so TP=4 holds exactly the slices of the TP=1 tensor. Technique
parameters are drawn while their block is built, under a per-block seed (`block_seed`), so they do
not depend on which pipeline stage builds the block either.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from loom.model.config import ModelConfig

_OUTPUT_PROJECTIONS = (".attention.proj.weight", ".mlp.down.weight")


def block_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + 7919 * (index + 1)) % (2**63)


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


def initial_value(name: str, full_shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full (unsharded) initial tensor of a tensor-parallel weight, by name."""
    key = "embedding.weight" if (name == "output_layer.weight" and cfg.tie_embeddings) else name
    std = cfg.init_std
    if name.endswith(_OUTPUT_PROJECTIONS):
        std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return torch.randn(full_shape, generator=_generator(seed, key)) * std


@torch.no_grad()
def init_tensor_parallel_weights(module: nn.Module, cfg: ModelConfig, seed: int, tp_rank: int, tp: int) -> None:
    """Write every split weight (`model.parallel.tp_rules`) as this rank's slice of its full initial
    value. ZeRO-3-partitioned parameters are gathered, written and re-partitioned (collective over DP)."""
    from loom.model.parallel.tp_rules import local_slice
    from loom.model.parallel.zero_state import gathered_for_write, local_shape

    for name, param in module.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            continue
        shape = local_shape(param)
        full_shape = list(shape)
        full_shape[param.partition_dim] *= tp
        full = initial_value(name, tuple(full_shape), cfg, seed)
        with gathered_for_write(param):
            param.data.copy_(local_slice(name, full, shape, tp, tp_rank).to(param.dtype))
