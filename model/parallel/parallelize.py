"""Apply the parallel layout to the network (torchtitan's `parallelize` step): build this rank's
pipeline stage with tensor-parallel layers, write layout-invariant initial weights, move it to the
device and wrap it in its DeepSpeed engine."""

from __future__ import annotations

import torch

from loom.model.config import ModelConfig
from loom.model.gpt import GPTStage
from loom.model.init import init_tensor_parallel_weights
from loom.model.parallel.compile import compile_blocks
from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.groups import Layout, megatron_layer_config
from loom.model.parallel.optim import OptimConfig, build_optimizer
from loom.model.parallel.sequence import SequenceShards, sync_replicated_grads
from loom.model.parallel.zero import (
    ShardedStage,
    deepspeed_config,
    zero3_init_context,
)
from loom.techniques.config import TechniquesConfig


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(precision: str) -> torch.dtype:
    """'auto' is bf16 where the GPU has it and fp32 on CPU (fp32 keeps CPU tests exact). 'fp64' is for
    the layout-equivalence tests only (train.precision does not offer it): in float64 a different
    reduction order between layouts stays at rounding level whatever the CPU's kernels."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]


def build_stage(
    cfg: ModelConfig,
    tech: TechniquesConfig,
    layout: Layout,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    sequence_parallel: bool = False,
    virtual_stages: int = 1,
) -> GPTStage:
    """This rank's stage (its `virtual_stages` model chunks) with its initial weights; identical weights
    for every layout (with or without sequence parallelism, which changes only where activations live)."""
    stage = GPTStage(
        cfg,
        tech,
        megatron_layer_config(torch.float32, sequence_parallel),
        tp=layout.tp,
        pp=layout.pp,
        pp_rank=layout.pp_rank,
        seed=seed,
        virtual_stages=virtual_stages,
    )
    init_tensor_parallel_weights(stage, cfg, seed, layout.tp_rank, layout.tp)
    return stage.to(device=device or default_device(), dtype=dtype)


def parallelize(
    cfg: ModelConfig,
    tech: TechniquesConfig,
    layout: Layout,
    parallel: ParallelConfig,
    *,
    optim: OptimConfig,
    micro_batch_size: int,
    seed: int,
    precision: str = "auto",
    deepspeed_overlay: dict | None = None,
    compile: bool = False,
    compile_cache: str | None = None,
) -> ShardedStage:
    """This rank's stage of the model, in its DeepSpeed engine, in the order the layout needs:

    1. the stage (this PP rank's blocks) with megatron-core's TP layers, weights identical at every
       layout (`build_stage`; under ZeRO-3 built inside `zero.Init`, so partitioned as it is built);
    2. sequence parallelism when `parallel.sequence_parallel`: the layers were built in SP mode, and the
       gradients of TP-replicated parameters are summed over the TP group as backward produces them
       (`sequence.sync_replicated_grads`);
    3. torch.compile of every block's attention and MLP when `compile` (`compile_blocks`);
    4. the DeepSpeed engine over the DP group (ZeRO `parallel.zero_stage`) with Loom's AdamW.

    `micro_batch_size` is per DP rank; `seed` keys the initial weights; `precision` is auto, fp32 or bf16
    (fp64 for the layout-equivalence tests); `deepspeed_overlay` adds engine options Loom does not model;
    `compile_cache` is inductor's on-disk cache."""
    dtype = resolve_dtype(precision)
    if dtype == torch.float64 and parallel.zero_stage == 3:
        raise ValueError("fp64 needs ZeRO 0-2: DeepSpeed's zero.Init builds half, bf16 or fp32 parameters only")
    ds_config = deepspeed_config(
        parallel, micro_batch_size, layout.dp, dtype == torch.bfloat16, optim.grad_clip, deepspeed_overlay
    )
    if parallel.zero_stage == 3:
        stage = _build_zero3_stage(cfg, tech, layout, parallel, ds_config, seed, dtype)
    else:
        # the engine keeps fp32 masters itself; the module holds the working dtype
        stage = build_stage(
            cfg,
            tech,
            layout,
            seed,
            dtype,
            sequence_parallel=parallel.sequence_parallel,
            virtual_stages=parallel.virtual_stages,
        )
    if parallel.sequence_parallel:
        stage.sequence_grad_hooks = sync_replicated_grads(stage, SequenceShards.current())
    if compile:
        compile_blocks(stage, compile_cache)
    return ShardedStage(stage, layout, parallel, ds_config, build_optimizer(stage, optim), optim.grad_clip)


def _build_zero3_stage(cfg, tech, layout, parallel, ds_config, seed, dtype) -> GPTStage:
    """Under zero.Init each parameter is partitioned as soon as its module is built, so the initial
    values are written through gathered parameters (every DP rank computes the same)."""
    import deepspeed

    deepspeed.init_distributed()  # zero.Init reads DeepSpeed's own view of the (existing) process group
    with zero3_init_context(parallel, ds_config):
        stage = GPTStage(
            cfg,
            tech,
            megatron_layer_config(torch.float32, parallel.sequence_parallel),
            tp=layout.tp,
            pp=layout.pp,
            pp_rank=layout.pp_rank,
            seed=seed,
        )
    init_tensor_parallel_weights(stage, cfg, seed, layout.tp_rank, layout.tp)
    return stage.to(device=default_device(), dtype=dtype)
