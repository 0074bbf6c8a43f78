"""Sequence parallelism (Megatron's SP): the residual stream is split along the sequence over the
tensor-parallel group.

Without SP every TP rank holds the full [s, b, d] activations of the norms, the residual adds and the
techniques' elementwise work; with SP each holds s/TP rows of them. megatron-core's layers do the
matching communication themselves (an all-gather before each column-parallel layer, a reduce-scatter
after each row-parallel one, both autograd-aware); this file holds what Loom adds around them:

- `SequenceShards`: which rows this rank holds, and the gather/scatter between the full sequence and the
  shard (the embedding output is scattered, SCA's projection is gathered);
- `previous_rows`: the last rows of the preceding shard (LCM's halo), with their gradient returned to the
  shard that sent them;
- `unsharded`: the same stage on whole sequences, for decoding;
- `sync_replicated_grads`: a parameter that is not split by TP (norms, the techniques' weights) sees only
  this rank's rows, so its gradient is a partial sum; a hook adds the TP ranks' partial sums before the
  gradient is accumulated, so DeepSpeed (whichever ZeRO stage, whenever it reduces) sees the full one.

megatron-core's sequence-parallel mappings are the only ones used, and only through this file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loom.model.parallel import comm


@dataclass(frozen=True)
class SequenceShards:
    """This rank's slice of the sequence: rows [rank·s/size, (rank+1)·s/size) of every [s, …] tensor."""

    group: object
    """The tensor-parallel process group, which SP shares."""
    size: int
    """Number of shards (the TP size)."""
    rank: int
    """This rank's shard index (its TP rank)."""

    @staticmethod
    def current() -> "SequenceShards":
        from megatron.core import parallel_state as ps

        return SequenceShards(
            ps.get_tensor_model_parallel_group(),
            ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_rank(),
        )

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a full-sequence tensor that needs no gradient back (ids, metadata)."""
        return full.chunk(self.size, dim=0)[self.rank]

    def scatter(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a full-sequence activation; backward all-gathers the gradient. A copy, not
        megatron's view of the full tensor: a saved view would keep the whole sequence's storage alive."""
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        return scatter_to_sequence_parallel_region(full, group=self.group).clone()

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The full sequence from every shard, for a computation every rank then repeats identically
        (so backward keeps this shard's rows of the gradient, without summing the identical copies)."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(shard, tensor_parallel_output_grad=False, group=self.group)

    def gather_summed(self, shard: torch.Tensor) -> torch.Tensor:
        """The full sequence from every shard, for a computation each rank uses differently (its own
        part of a halo or a prefix), so backward sums the ranks' gradients and keeps this shard's rows."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(shard, tensor_parallel_output_grad=True, group=self.group)

    def previous_rows(self, shard: torch.Tensor, rows: int) -> torch.Tensor:
        """The last `rows` rows of the preceding shard (zeros on the first), `[rows, …]`. An all-gather of
        every shard's tail rather than point-to-point: rows·b·d values per shard, and its backward (a
        reduce-scatter) returns the halo's gradient to the shard it came from."""
        if shard.shape[0] < rows:
            raise ValueError(f"a sequence shard of {shard.shape[0]} rows cannot supply a halo of {rows} rows")
        tails = self.gather_summed(shard[shard.shape[0] - rows :])  # [size·rows, …]
        if self.rank == 0:
            # zeros that still depend on the gather: every rank must reach its backward (a collective)
            return tails[:rows] * 0
        return tails[(self.rank - 1) * rows : self.rank * rows]

    def earlier_shards(self, per_shard: torch.Tensor) -> torch.Tensor:
        """Every shard's `per_shard` value `[1, …]` stacked in shard order, `[size, …]`; its gradient
        reaches each shard's value from the later shards that used it. Every rank's result must stay in
        its autograd graph (the first shard's too, if only times zero): the backward is a collective."""
        return self.gather_summed(per_shard)


@contextlib.contextmanager
def unsharded(stage: nn.Module):
    """Run a stage built in SP mode on whole sequences for a while (decoding: one new token per step
    cannot be split over ranks). Forward only: megatron's layers read their `sequence_parallel` flag at
    every call, so switching it off makes them all-reduce instead of gather/scatter; weights are shared."""
    layers = [m for m in stage.modules() if getattr(m, "sequence_parallel", False) is True]
    shards = stage.sequence
    for layer in layers:
        layer.sequence_parallel = False
    stage.sequence = None
    try:
        yield stage
    finally:
        for layer in layers:
            layer.sequence_parallel = True
        stage.sequence = shards


def sync_replicated_grads(module: nn.Module, shards: SequenceShards) -> list:
    """Sum every TP-replicated parameter's gradient over the SP group as autograd produces it (before
    accumulation, so it also holds under ZeRO-2's reduce-as-you-go hooks and gradient accumulation).
    Split parameters (megatron's `tensor_model_parallel` tag) already get whole gradients from their
    layers. Returns the hook handles."""
    handles = []
    for param in module.parameters():
        if param.requires_grad and not getattr(param, "tensor_model_parallel", False):
            handles.append(param.register_hook(lambda grad: _summed_over(grad, shards.group)))
    return handles


def _summed_over(grad: torch.Tensor, group) -> torch.Tensor:
    summed = grad.clone()
    comm.all_reduce(summed, group=group)
    return summed


def sequence_shards_of(layer_config) -> SequenceShards | None:
    """The shards when megatron's layers were built in SP mode, else None."""
    if not getattr(layer_config, "sequence_parallel", False) or not dist.is_initialized():
        return None
    return SequenceShards.current()
