"""The DP×PP×TP process grid (megatron-core's `parallel_state`) and DeepSpeed's view of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from loom.model.parallel.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the grid."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp} · "
            f"pp stage {self.pp_rank}/{self.pp} · tp {self.tp_rank}/{self.tp}"
        )


def init_parallel_groups(parallel: ParallelConfig) -> Layout:
    """Build the grid on an initialised default process group (gloo or NCCL alike)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # every group gets the run's timeout, so a hung peer fails the run instead of stalling it for 30 min
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        distributed_timeout_minutes=parallel.timeout_s / 60,
    )
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def describe_grid() -> str:
    """One line per rank (gathered), for the start-of-run log."""
    from loom.model.parallel import comm

    return "\n".join(comm.all_gather_object(current_layout().describe()))


class MegatronMPU:
    """DeepSpeed's `mpu` interface over megatron-core's groups.

    DeepSpeed partitions ZeRO state over `get_data_parallel_group()` and all-reduces grad norms over
    `get_model_parallel_group()` (TP×PP); megatron-core no longer has the `get_model_parallel_rank`
    family DeepSpeed calls, so `parallel_state` cannot be passed directly.
    """

    @staticmethod
    def _ps():
        from megatron.core import parallel_state as ps

        return ps

    def get_model_parallel_group(self):
        return self._ps().get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return dist.get_rank(self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return self._ps().get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def megatron_layer_config(params_dtype: torch.dtype, sequence_parallel: bool = False):
    """The ModelParallelConfig megatron's TP layers read: CPU-side full-weight init (identical
    weights at every TP size) and no fusions, which on CPU silently route through torch.compile.
    `sequence_parallel` builds the layers in SP mode (training only: decoding runs without it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
    )
