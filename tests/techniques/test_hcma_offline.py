"""HCMA offline mode inside a training run: the aligned table must reach DeepSpeed's fp32 master weights
(else the next optimizer step silently reverts it) at every ZeRO stage, ZeRO-3's partitioned parameters
included, and a tied output copy on the last stage; and training with it at TP 2 (and under ZeRO-3) must
reproduce one process that applies the same offline step to its whole table."""

import dataclasses

import pytest
import torch

from loom.model.parallel.config import ParallelConfig
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import (
    MICRO_BATCH,
    OPTIM,
    SEQ,
    all_techniques,
    assert_traces_match,
    fixed_batches,
    init_layout,
    layout_trace,
    reference_trace,
    tiny_model,
)


def _full(param) -> torch.Tensor:
    """The whole (TP-local) working copy, gathered under ZeRO-3."""
    from loom.model.parallel.zero_state import gathered

    with gathered([param]):
        return param.detach().clone()


def _offline_alignment_survives_a_step(rank, world_size, tp, pp, zero):
    from deepspeed.utils import safe_get_full_fp32_param

    from loom.launch.train.technique_upkeep import upkeep
    from loom.model.parallel.parallelize import parallelize

    layout = init_layout(rank, tp, pp)
    tech = TechniquesConfig()
    tech.hcma = all_techniques(mode="offline").hcma
    cfg = tiny_model(tie_embeddings=pp > 1)
    sharded = parallelize(
        cfg,
        tech,
        layout,
        ParallelConfig(tensor=tp, pipeline=pp, zero_stage=zero, microbatches=2),
        optim=dataclasses.replace(OPTIM, lr=0.0, weight_decay=0.0),
        micro_batch_size=MICRO_BATCH,
        seed=0,
        precision="fp32",
    )
    module = sharded.module
    weight = module.embedding.weight if module.is_first else module.output_layer.weight
    before = _full(weight)
    upkeep(sharded, layout, step=0)
    aligned = _full(weight)
    master = safe_get_full_fp32_param(weight)
    sharded.train_step(fixed_batches(2, cfg.vocab_size), 0, module.carry_specs(MICRO_BATCH, SEQ, torch.float32))
    after = _full(weight)
    return dict(
        changed=float((aligned - before).abs().max()),
        master_err=float((master - aligned).abs().max()),
        reverted=float((after - aligned).abs().max()),
        first=module.is_first,
        aligned=aligned,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,zero", [(1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 1), (1, 2, 1)])
def test_offline_alignment_reaches_fp32_masters_and_tied_copy(tp, pp, zero):
    dp = 2 if tp * pp == 1 else 1
    results = run_distributed(_offline_alignment_survives_a_step, tp * pp * dp, tp, pp, zero)
    for r in results:
        assert r["changed"] > 1e-6, "offline alignment did not move the table"
        assert r["master_err"] < 1e-6, "DeepSpeed's fp32 master does not hold the aligned table"
        assert r["reverted"] < 1e-6, "the optimizer step reverted the alignment"
    if pp > 1:
        first = next(r for r in results if r["first"])["aligned"]
        last = next(r for r in results if not r["first"])["aligned"]
        assert torch.equal(first, last), "the tied output copy was not updated"
    if zero == 3:  # both data-parallel ranks hold the same aligned table, gathered from their partitions
        assert torch.equal(results[0]["aligned"], results[1]["aligned"])


# --------------------------------------------------------------------------- training against one process
STEPS = 3


def _offline_tech(everything: bool) -> TechniquesConfig:
    full = all_techniques(mode="offline")  # HCMA refreshes (and realigns) every 2 steps
    if everything:
        return full
    tech = TechniquesConfig()
    tech.hcma = full.hcma
    return tech


def _reference_with_offline_step(rank, world_size, cfg, tech, steps, num_steps):
    """One process, plain PyTorch: after each refresh the offline step realigns the whole table in place
    (no fp32 master to write: the parameter is the only copy)."""
    from loom.techniques.hcma import HCMA

    refresh = HCMA.refresh

    def refresh_then_align(self, weight, *args, **kwargs):
        refresh(self, weight, *args, **kwargs)
        if self.cfg.mode == "offline":
            weight.copy_(self.offline_align(weight))

    HCMA.refresh = refresh_then_align  # in this forked process only
    return reference_trace(rank, world_size, cfg, tech, steps, num_steps)


@pytest.fixture(scope="module")
def offline_references():
    cfg = tiny_model()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    refs = {}
    for everything in (False, True):
        tech = _offline_tech(everything)
        refs[everything] = run_distributed(_reference_with_offline_step, 1, cfg, tech, steps, STEPS)[0]
    return cfg, steps, refs


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,dp,zero,everything",
    [(2, 1, 1, False), (2, 1, 2, True), (1, 2, 3, False)],
    ids=["tp2-zero1-hcma", "tp2-zero2-all-five", "dp2-zero3-hcma"],
)
def test_offline_training_matches_one_process(offline_references, tp, dp, zero, everything):
    """TP 2 (the refresh gathers the projected rows; each rank realigns its vocabulary shard) and ZeRO-3
    (the realigned table written into partitioned fp32 masters) against one process realigning the whole
    table. The reference's own trace is checked to differ from a run without the offline step, so the
    comparison covers the realignment."""
    cfg, steps, refs = offline_references
    tech = _offline_tech(everything)
    if zero == 3:  # SCA's field statistics are per data-parallel rank by design: keep it out of the DP run
        tech = dataclasses.replace(tech, sca=dataclasses.replace(tech.sca, enabled=False))
    ref = refs[everything]
    regularizer = dataclasses.replace(tech, hcma=dataclasses.replace(tech.hcma, mode="regularizer", lambda_hcma=0.0))
    without = run_distributed(reference_trace, 1, cfg, regularizer, steps, 1)[0]
    assert without.losses[0] != ref.losses[0], "the offline step did not change the network"
    traces = run_distributed(layout_trace, tp * dp, cfg, tech, steps, STEPS, tp, 1, [zero], timeout=600)
    for rank_traces in traces:
        for stage, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"HCMA offline tp{tp} dp{dp} zero{stage}")
