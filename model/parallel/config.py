"""How one run is laid out over its processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (megatron-core column/row-parallel layers)."""
    pipeline: int = 1
    """Pipeline-parallel stages (Loom's own 1F1B schedule)."""
    sequence_parallel: bool = False
    """Split the residual stream along the sequence over the tensor-parallel group (Megatron's sequence
    parallelism; needs tensor > 1): norms, residual adds and the techniques' per-token work hold s/tensor
    rows per rank instead of all s, at the cost of an all-gather/reduce-scatter pair in place of each
    all-reduce. Same results as without it; training only (evaluation and decoding run unsharded)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B): with v > 1 each rank holds v non-adjacent slices of
    the blocks, so the pipeline fills and drains v times faster and its idle fraction drops from
    (p-1)/(m+p-1) to (p-1)/(v·m+p-1), for v times as many point-to-point messages. Needs pipeline > 1,
    microbatches a multiple of pipeline and model.num_layers a multiple of pipeline × virtual_stages."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage over the data-parallel group: 0, 1, 2 or 3 (3 only with pipeline=1)."""
    microbatches: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation / pipeline depth)."""
    reduce_bucket_size: int = 50_000_000
    """DeepSpeed reduce/all-gather bucket size in elements; small on CPU avoids huge buffers."""
    overlap_comm: bool = False
    """ZeRO 1-2 with pipeline=1: reduce each gradient bucket from the backward hooks as it fills, on a side
    stream, so communication overlaps the rest of backward (DeepSpeed's `overlap_comm`; a second bucket of
    memory; the same sums). ZeRO-3 always overlaps (DeepSpeed's default there). Not yet with pipeline > 1,
    where Loom's schedule decides when gradients are reduced."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for a peer before the run fails, naming the silent rank."""

    def validate(self, world_size: int | None) -> list[str]:
        problems = []
        for name in ("tensor", "pipeline", "virtual_stages", "microbatches", "reduce_bucket_size", "timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"parallel.{name} must be positive, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 3 and self.pipeline > 1:
            problems.append(
                "ZeRO-3 with parallel.pipeline > 1 is not supported: use zero_stage 0, 1 or 2 with pipeline parallelism"
            )
        if self.sequence_parallel and self.tensor == 1:
            problems.append("parallel.sequence_parallel needs parallel.tensor > 1 (it splits the sequence over TP)")
        if self.overlap_comm and (self.zero_stage not in (1, 2) or self.pipeline > 1):
            problems.append(
                "parallel.overlap_comm needs zero_stage 1 or 2 and pipeline 1 (ZeRO-3 overlaps anyway; "
                "under pipeline parallelism Loom's schedule reduces once per step)"
            )
        if problems:
            return problems
        problems += self._interleaving_problems()
        if world_size is not None and world_size % (self.tensor * self.pipeline):
            problems.append(
                f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline "
                f"= {self.tensor} × {self.pipeline}"
            )
        return problems

    def _interleaving_problems(self) -> list[str]:
        if self.virtual_stages == 1:
            return []
        if self.pipeline == 1:
            return [f"parallel.virtual_stages {self.virtual_stages} needs parallel.pipeline > 1"]
        if self.microbatches % self.pipeline:
            # the interleaved order walks micro-batches in groups of `pipeline` per model chunk
            return [
                f"parallel.virtual_stages > 1 needs parallel.microbatches ({self.microbatches}) to be a multiple "
                f"of parallel.pipeline ({self.pipeline})"
            ]
        return []
