"""Shared pieces of the parallel-equivalence tests: a tiny model, fixed batches, the single-process
reference (plain PyTorch AdamW + clip_grad_norm_, no DeepSpeed) and the same steps at any layout.

Both run in float64 where DeepSpeed allows it (ZeRO 0-2) and in float32 under ZeRO-3, whose zero.Init
builds no float64 parameters; `tests/parallel/traces.py` holds the comparison and its bounds.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from loom.model.config import ModelConfig
from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.optim import OptimConfig
from loom.techniques.config import TechniquesConfig
from tests.parallel.traces import Trace, adam_reach, assert_traces_match  # noqa: F401  (re-exported)

SEQ = 16
MICRO_BATCH = 2
EOS = 3


def tiny_model(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=500,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        ffn_hidden_size=96,
        seq_length=SEQ,
        eos_id=EOS,
        pad_vocab_to_multiple_of=128,
    )
    base.update(overrides)
    return ModelConfig(**base)


def all_techniques(**hcma) -> TechniquesConfig:
    """All five on, sized for the tiny model so every code path runs (SCR's ρ and CMR's bank
    cross pipeline stages, SCA's field term is live from step 0, HCMA refreshes every step)."""
    tech = TechniquesConfig()
    tech.lcm.enabled = True
    tech.lcm.K = 4
    tech.scr.enabled, tech.scr.rank = True, 8
    tech.cmr.enabled, tech.cmr.rank = True, 8
    tech.sca.enabled, tech.sca.rank, tech.sca.window, tech.sca.warmup_steps = True, 8, 8, 0
    tech.hcma.enabled, tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = True, 4, 8, 16, 4
    tech.hcma.refresh_every, tech.hcma.lambda_hcma = 2, 0.1
    for key, value in hcma.items():
        setattr(tech.hcma, key, value)
    return tech


# eps 1e-5, not 1e-8: Adam divides each gradient element by its own magnitude (plus eps), so a
# rounding-level gradient difference between layouts moves a weight by up to lr/eps times itself; the
# weight check allows for that (`tests/parallel/traces.py`), and a larger eps keeps the allowance small
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=0.05, eps=1e-5)


def fixed_batches(num: int, vocab: int, seed: int = 7) -> list[torch.Tensor]:
    """`num` micro-batches [MICRO_BATCH, SEQ+1] of ids with a few EOS so documents are packed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        t = torch.randint(4, vocab, (MICRO_BATCH, SEQ + 1), generator=g)
        t[0, 5] = EOS
        t[1, 11] = EOS
        out.append(t)
    return out


def run_precision(zero: int, cfg: ModelConfig, pp: int) -> tuple[str, str]:
    """(precision, key of TOLERANCES) of one equivalence run. float64 wherever DeepSpeed allows it;
    float32 under ZeRO-3 (zero.Init builds half, bf16 or fp32 parameters only) and under ZeRO-1 with
    the embedding tied across pipeline stages: for a float64 model ZeRO-1 accumulates gradients in a
    separate float32 attribute (`grad_accum`, DeepSpeed's gradient accumulation dtype defaults to fp32)
    instead of `.grad`, where Loom's tied-embedding sync reads them."""
    if zero == 3 or (zero == 1 and cfg.tie_embeddings and pp > 1):
        return "fp32", "fp32"
    return "fp64", "fp64" if zero == 0 else "fp64-fp32-masters"


def allow_float64() -> None:
    """Lift the float32 assumptions between Loom and a float64 model, inside the test ranks only:
    DeepSpeed's CPU accelerator leaves float64 out of the dtypes it lets ZeRO-0 all-reduce, and
    megatron-core's vocab-parallel cross-entropy casts the logits to float32. Both stay as they were
    for float32 and bf16."""
    from deepspeed.accelerator import get_accelerator
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    accelerator = get_accelerator()
    declared = accelerator.supported_dtypes()
    if torch.float64 not in declared:
        accelerator.supported_dtypes = lambda: [*declared, torch.float64]

    def logits_max_keeping_float64(logits):
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return logits, torch.max(logits, dim=-1)[0]

    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(logits_max_keeping_float64)


def init_layout(rank: int, tp: int, pp: int):
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.groups import init_parallel_groups

    cpu_compat.apply()
    return init_parallel_groups(ParallelConfig(tensor=tp, pipeline=pp))


def reference_trace(
    rank,
    world_size,
    cfg: ModelConfig,
    tech: TechniquesConfig,
    batches_per_step: list,
    steps: int,
    optim: OptimConfig = OPTIM,
    seed: int = 0,
) -> Trace:
    """One process, TP=PP=DP=1, float64: the oracle every layout must reproduce."""
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.optim import build_optimizer
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.aux_loss import set_aux_loss_scale

    allow_float64()
    layout = init_layout(rank, 1, 1)
    module = build_stage(cfg, tech, layout, seed, torch.float64)
    opt = build_optimizer(module, optim)
    names = {p: n for n, p in module.named_parameters()}
    clip = optim.grad_clip if optim.grad_clip > 0 else 1e30
    trace = Trace()
    for step in range(steps):
        batches = batches_per_step[step % len(batches_per_step)]
        if module.hcma is not None and module.hcma.due(step):
            module.hcma.refresh(module.embedding.weight.detach(), 0, cfg.vocab_size)
        opt.zero_grad(set_to_none=True)
        set_aux_loss_scale(1.0 / len(batches))
        total = 0.0
        for mb in batches:
            loss = module(mb, None, step=step)
            (loss / len(batches)).backward()
            total += loss.item()
        trace.grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
        norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), clip))
        opt.step()
        trace.losses.append(total / len(batches))
        trace.grad_norms.append(norm)
        trace.adam_reach.append(adam_reach(opt, names, min(1.0, clip / (norm + 1e-6))))
    trace.weights = full_state_dict(module)
    return trace


def layout_trace(
    rank,
    world_size,
    cfg: ModelConfig,
    tech: TechniquesConfig,
    batches_per_step: list,
    steps: int,
    tp: int,
    pp: int,
    zero_stages: list,
    optim: OptimConfig = OPTIM,
    seed: int = 0,
    compile: bool = False,
    mutate: Callable | None = None,
    parallel_overrides: dict | None = None,
) -> dict:
    """Train the same steps at TP×PP×DP on this group, once per ZeRO stage; {stage: Trace}.
    `mutate(sharded)` runs after the engine is built (the mutation tests break the code there)."""
    from loom.launch.train.technique_upkeep import upkeep
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.parallelize import parallelize, resolve_dtype

    allow_float64()
    layout = init_layout(rank, tp, pp)
    out = {}
    for zero in zero_stages:
        nmb = len(batches_per_step[0]) // layout.dp
        parallel = ParallelConfig(tensor=tp, pipeline=pp, zero_stage=zero, microbatches=nmb)
        for key, value in (parallel_overrides or {}).items():
            setattr(parallel, key, value)
        precision, tolerance = run_precision(zero, cfg, pp)
        sharded = parallelize(
            cfg,
            tech,
            layout,
            parallel,
            optim=copy.copy(optim),
            micro_batch_size=MICRO_BATCH,
            seed=seed,
            precision=precision,
            compile=compile,
        )
        if precision == "fp64" and zero == 0:
            sharded.engine.communication_data_type = torch.float64  # DeepSpeed's default is float32
        if mutate is not None:
            mutate(sharded)
        specs = sharded.module.carry_specs(MICRO_BATCH, SEQ, resolve_dtype(precision))
        trace = Trace(tolerance=tolerance)
        local_grads = record_gradients(sharded)
        for step in range(steps):
            batches = batches_per_step[step % len(batches_per_step)]
            mine = batches[layout.dp_rank * nmb : (layout.dp_rank + 1) * nmb]
            upkeep(sharded, layout, step)
            result = sharded.train_step(mine, step, specs)
            trace.losses.append(result.loss)
            trace.grad_norms.append(result.grad_norm)
        trace.weights = full_state_dict(sharded.module)
        trace.grads = [full_tensors(sharded.module, grads) for grads in local_grads]
        out[zero] = trace
        sharded.engine.destroy()
    return out


def record_gradients(sharded) -> list:
    """Per optimizer step, {name: this rank's TP-local gradient, reduced over DP, before clipping}, taken
    where the optimizer is about to use it: before Loom's own clipping (ZeRO-0), else on entering the
    ZeRO optimizer's step (DeepSpeed clips inside it)."""
    from deepspeed.utils import safe_get_full_grad

    from loom.model.parallel.zero_state import local_shape

    steps: list = []
    params = list(sharded.module.named_parameters())

    def take():
        grads = {}
        for name, param in params:
            grad = safe_get_full_grad(param)
            if grad is not None:
                grads[name] = grad.detach().clone().reshape(local_shape(param))
        steps.append(grads)

    if sharded.own_clipping:
        clip = sharded._clip_global_grad_norm

        def take_then_clip():
            take()
            return clip()

        sharded._clip_global_grad_norm = take_then_clip
    else:
        optimizer = sharded.engine.optimizer
        step = optimizer.step

        def take_then_step(*args, **kwargs):
            take()
            return step(*args, **kwargs)

        optimizer.step = take_then_step
    return steps


def full_tensors(module, local: dict) -> dict:
    """TP-local tensors named like `module`'s parameters, gathered whole and merged over the stages."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = dist.get_world_size(tp_group)
    params = dict(module.named_parameters())
    out = {}
    for name, value in local.items():
        param = params[name]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(value) for _ in range(tp)]
            dist.all_gather(parts, value.contiguous(), group=tp_group)
            value = torch.cat(parts, dim=param.partition_dim)
        out[name] = value.cpu()
    pp_group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        stages: list = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, out, group=pp_group)
        out = {name: value for stage in stages for name, value in stage.items()}
    if getattr(module, "tied_across_stages", False):
        out.pop("output_layer.weight", None)  # the last stage's copy of the tied embedding
    return out
