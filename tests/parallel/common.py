"""Shared pieces of the parallel-equivalence tests: a tiny model, fixed batches, and the
single-process reference (plain PyTorch AdamW + clip_grad_norm_, no DeepSpeed)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from loom.model.config import ModelConfig
from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.zero import OptimizerSettings
from loom.techniques.config import TechniquesConfig

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


# eps 1e-5, not 1e-8: Adam divides each gradient element by its own magnitude, so with a tiny eps an
# element whose gradient is at rounding level (reduction order differs between layouts) takes a
# full lr-sized step either way, and compared weights would measure noise instead of correctness
OPTIM = OptimizerSettings(lr=3e-3, weight_decay=0.1, grad_clip=0.05, eps=1e-5)


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


@dataclass
class Trace:
    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    weights: dict = field(default_factory=dict)


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
    optim: OptimizerSettings = OPTIM,
    seed: int = 0,
) -> Trace:
    """One process, TP=PP=DP=1: the oracle every layout must reproduce."""
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.parallelize import build_stage
    from loom.model.parallel.zero import build_optimizer
    from loom.techniques.aux_loss import set_aux_loss_scale

    layout = init_layout(rank, 1, 1)
    module = build_stage(cfg, tech, layout, seed)
    opt = build_optimizer(module, optim)
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
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), optim.grad_clip if optim.grad_clip > 0 else 1e30)
        opt.step()
        trace.losses.append(total / len(batches))
        trace.grad_norms.append(float(norm))
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
    optim: OptimizerSettings = OPTIM,
    seed: int = 0,
    compile: bool = False,
) -> dict:
    """Train the same steps at TP×PP×DP on this group, once per ZeRO stage; {stage: Trace}."""
    from loom.launch.train.technique_upkeep import upkeep
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.parallelize import parallelize

    layout = init_layout(rank, tp, pp)
    out = {}
    for zero in zero_stages:
        nmb = len(batches_per_step[0]) // layout.dp
        parallel = ParallelConfig(tensor=tp, pipeline=pp, zero_stage=zero, microbatches=nmb)
        sharded = parallelize(
            cfg, tech, layout, parallel, copy.copy(optim), MICRO_BATCH, seed, precision="fp32", compile=compile
        )
        specs = sharded.module.carry_specs(MICRO_BATCH, SEQ, torch.float32)
        trace = Trace()
        for step in range(steps):
            batches = batches_per_step[step % len(batches_per_step)]
            mine = batches[layout.dp_rank * nmb : (layout.dp_rank + 1) * nmb]
            upkeep(sharded, layout, step)
            result = sharded.train_step(mine, step, specs)
            trace.losses.append(result.loss)
            trace.grad_norms.append(result.grad_norm)
        trace.weights = full_state_dict(sharded.module)
        out[zero] = trace
        sharded.engine.destroy()
    return out


def assert_traces_match(ref: Trace, got: Trace, rtol: float = 1e-5, what: str = "") -> None:
    for i, (a, b) in enumerate(zip(ref.losses, got.losses)):
        assert abs(a - b) <= rtol * abs(a), f"{what} step {i} loss {b} != reference {a}"
    for i, (a, b) in enumerate(zip(ref.grad_norms, got.grad_norms)):
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-7, f"{what} step {i} grad norm {b} != reference {a}"
    assert len(got.losses) == len(ref.losses)
    missing = set(ref.weights) ^ set(got.weights)
    assert not missing, f"{what} parameter names differ: {sorted(missing)[:5]}"
    for name, value in ref.weights.items():
        other = got.weights[name]
        assert other.shape == value.shape, f"{what} {name} shape {tuple(other.shape)} != {tuple(value.shape)}"
        err = (other.float() - value.float()).abs().max().item()
        scale = value.float().abs().max().item() + 1e-6
        assert err <= 1e-4 * scale + 1e-6, f"{what} updated weight {name} differs by {err:.3g} (scale {scale:.3g})"
