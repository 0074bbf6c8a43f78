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
from loom.model.parallel.zero import (
    OptimizerSettings,
    ShardedStage,
    build_optimizer,
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
) -> GPTStage:
    """This rank's stage with its initial weights; identical weights for every layout."""
    stage = GPTStage(
        cfg, tech, megatron_layer_config(torch.float32), tp=layout.tp, pp=layout.pp, pp_rank=layout.pp_rank, seed=seed
    )
    init_tensor_parallel_weights(stage, cfg, seed, layout.tp_rank, layout.tp)
    return stage.to(device=device or default_device(), dtype=dtype)


def parallelize(
    cfg: ModelConfig,
    tech: TechniquesConfig,
    layout: Layout,
    parallel: ParallelConfig,
    optim: OptimizerSettings,
    micro_batch_size: int,
    seed: int,
    precision: str = "auto",
    deepspeed_overlay: dict | None = None,
    compile_cache: str | None = None,
    compile: bool = False,
) -> ShardedStage:
    """This rank's stage in its DeepSpeed engine; `compile` applies `compile_blocks` before wrapping."""
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
        stage = build_stage(cfg, tech, layout, seed, dtype)
    if compile:
        compile_blocks(stage, compile_cache)
    return ShardedStage(stage, layout, parallel, ds_config, build_optimizer(stage, optim), optim.grad_clip)


def _build_zero3_stage(cfg, tech, layout, parallel, ds_config, seed, dtype) -> GPTStage:
    """Under zero.Init each parameter is partitioned as soon as its module is built, so the
    initial values are written through GatheredParameters (every DP rank computes the same)."""
    import deepspeed

    from loom.model.init import initial_value

    deepspeed.init_distributed()  # zero.Init reads DeepSpeed's own view of the (existing) process group
    with zero3_init_context(parallel, ds_config):
        stage = GPTStage(
            cfg,
            tech,
            megatron_layer_config(torch.float32),
            tp=layout.tp,
            pp=layout.pp,
            pp_rank=layout.pp_rank,
            seed=seed,
        )
    for name, param in stage.named_parameters():
        if not getattr(param, "tensor_model_parallel", False):
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            full_shape = list(param.ds_shape)
            full_shape[param.partition_dim] *= layout.tp
            full = initial_value(name, tuple(full_shape), cfg, seed)
            param.data.copy_(full.chunk(layout.tp, dim=param.partition_dim)[layout.tp_rank])
    return stage.to(device=default_device(), dtype=dtype)
