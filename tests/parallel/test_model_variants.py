"""Model options under parallelism: tied embeddings across pipeline stages, grouped-query
attention split over TP, activation checkpointing, bf16, and a short run that learns at TP2×PP2."""

import dataclasses
import os

import pytest
import torch

from loom.model.parallel.config import ParallelConfig
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import (
    MICRO_BATCH,
    OPTIM,
    SEQ,
    assert_traces_match,
    fixed_batches,
    init_layout,
    layout_trace,
    reference_trace,
    tiny_model,
)

STEPS = 3


def _check(cfg, layouts):
    tech = TechniquesConfig()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    for tp, pp, zeros in layouts:
        for rank_traces in run_distributed(layout_trace, tp * pp, cfg, tech, steps, STEPS, tp, pp, zeros):
            for zero, trace in rank_traces.items():
                assert_traces_match(ref, trace, what=f"tp{tp} pp{pp} zero{zero}")


@pytest.mark.distributed
def test_tied_embeddings_across_stages():
    _check(tiny_model(tie_embeddings=True), [(1, 1, [0, 1, 2, 3]), (1, 2, [0, 1]), (2, 2, [1])])


@pytest.mark.distributed
def test_grouped_query_attention_over_tp():
    _check(tiny_model(num_heads=4, num_kv_heads=2), [(2, 1, [1]), (2, 2, [2])])


@pytest.mark.distributed
def test_activation_checkpointing_changes_nothing():
    _check(tiny_model(activation_checkpointing=True), [(2, 1, [2]), (1, 2, [1])])


def _train_tp2pp2(rank, world_size, steps, precision):
    from loom.model.parallel.parallelize import parallelize

    layout = init_layout(rank, 2, 2)
    cfg = tiny_model()
    sharded = parallelize(
        cfg,
        TechniquesConfig(),
        layout,
        ParallelConfig(tensor=2, pipeline=2, zero_stage=1, microbatches=4),
        optim=dataclasses.replace(OPTIM, grad_clip=1.0),
        micro_batch_size=MICRO_BATCH,
        seed=0,
        precision=precision,
    )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    specs = sharded.module.carry_specs(MICRO_BATCH, SEQ, dtype)
    batches = fixed_batches(4, cfg.vocab_size, seed=3)  # one fixed batch: the model must memorise it
    return [sharded.train_step(batches, step, specs).loss for step in range(steps)]


@pytest.mark.distributed
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_model_learns_at_tp2_pp2(precision):
    losses = run_distributed(_train_tp2pp2, 4, 25, precision)
    for rank_losses in losses:
        assert all(torch.isfinite(torch.tensor(rank_losses)))
        assert rank_losses[-1] < 0.7 * rank_losses[0], rank_losses
    assert losses[0] == losses[3], "every rank must report the same loss"


def _compiled_trace(rank, world_size, cfg, tech, steps, n_steps, tp, pp, zeros, cache_dir):
    import torch._dynamo
    import torch._inductor.config

    import loom.model.parallel.parallelize as parallelize_module

    torch._inductor.config.compile_threads = 1  # no compile-worker pool inside the forked test ranks
    compiled = []

    def compile_without_fallback(stage, _cache):
        compiled.append(parallelize_module.compile_blocks.__wrapped__(stage, cache_dir))
        torch._dynamo.config.suppress_errors = False  # a compile failure fails the test instead of running eagerly

    compile_without_fallback.__wrapped__ = parallelize_module.compile_blocks
    parallelize_module.compile_blocks = compile_without_fallback
    out = layout_trace(rank, world_size, cfg, tech, steps, n_steps, tp, pp, zeros, compile=True)
    assert compiled == [2 * cfg.num_layers // pp], f"compiled {compiled} sub-blocks"
    return out


def _inductor_cache_for_these_kernels() -> str:
    """Inductor's on-disk cache (its precompiled header) does not tell ATEN_CPU_CAPABILITY settings
    apart: code cached under one fails to compile under another ('at::vec has not been declared'),
    so each setting gets its own cache, kept warm between runs."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.join(default_cache_dir(), f"loom-tests-{torch.backends.cpu.get_cpu_capability().lower()}")


@pytest.mark.slow  # inductor compiles C++ on a cold cache (20+ s)
@pytest.mark.distributed
def test_compiled_blocks_match_eager_reference(monkeypatch):
    """train.compile=true (inductor, no graph-break fallback allowed) at TP2 gives the eager
    single-process losses, gradient norms, gradients and weights."""
    cache = _inductor_cache_for_these_kernels()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", cache)  # the forked ranks inherit it
    cfg, tech = tiny_model(), TechniquesConfig()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    for rank_traces in run_distributed(_compiled_trace, 2, cfg, tech, steps, STEPS, 2, 1, [1], cache, timeout=600):
        assert_traces_match(ref, rank_traces[1], what="compiled blocks tp2 zero1")
