"""Opt-in `torch.compile` of every block's attention and MLP sub-blocks (torchtitan compiles per
block too): inductor fuses the norms, RoPE, SwiGLU's gating and the residual adds around the
matmuls. Only these two pure functions are compiled, so the techniques' side effects (SCA's EMA
update) and activation checkpointing stay eager and unchanged.

The first step pays the compilation; inductor's on-disk cache (`cache_dir`) makes later runs of
the same shapes start fast. A graph that fails to compile runs eagerly (dynamo's `suppress_errors`)
with a warning instead of stopping the run.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def compile_blocks(stage: nn.Module, cache_dir: str | None = None) -> int:
    """Compile each block's `_attention_residual` and `_mlp_residual` in place; returns the count."""
    import torch._dynamo

    if cache_dir:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
    torch._dynamo.config.suppress_errors = True
    _silence_default_tp_group_warning()
    compiled = 0
    for block in stage.layers.values():
        for name in ("_attention_residual", "_mlp_residual"):
            setattr(block, name, torch.compile(getattr(block, name), dynamic=False))
            compiled += 1
    return compiled


def _silence_default_tp_group_warning() -> None:
    """megatron-core's RowParallelLinear passes `tp_group=None` to its own linear on every call, and
    the lookup of the default group warns on rank 0 each time; inside a compiled block that warning
    is a graph break (on rank 0 only). Same lookup, without the warning."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers

    def default_tp_group(tp_group, is_expert=False, check_initialized=True):
        if tp_group is not None or not torch.distributed.is_initialized() or not parallel_state.is_initialized():
            return tp_group
        if is_expert:
            return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)

    layers.get_tensor_model_parallel_group_if_none = default_tp_group
