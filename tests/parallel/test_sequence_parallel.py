"""Sequence parallelism reproduces the single-process model: every layout with `parallel.sequence_parallel`
(TP 2 and 4, with pipeline and data parallelism, ZeRO 0-3) gives the reference's per-step losses, grad
norms, gradients and updated weights, with the techniques off and with all five on (LCM's halo, SCR's
prefix across shards, CMR's sharded bank and reconstruction loss, SCA's gathered projection, HCMA before
the scatter). The mutation tests break each piece of that and see the comparison fail."""

import pytest

from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import (
    all_techniques,
    assert_traces_match,
    fixed_batches,
    layout_trace,
    reference_trace,
    tiny_model,
)
from tests.parallel.traces import TraceMismatch

STEPS = 3
SP = {"sequence_parallel": True}


def all_five_sharded() -> TechniquesConfig:
    """All five, with every part that sharding touches live: LCM's smoothness loss and CMR's
    reconstruction loss (per-token means over a shard), SCR's decay (the carry decays across shards)."""
    tech = all_techniques()
    tech.lcm.aux_smooth_weight = 0.1
    tech.cmr.rec_loss_weight = 0.1
    tech.scr.decay = 0.9
    return tech


def _reference(tech, steps=STEPS, **model):
    cfg = tiny_model(**model)
    batches = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    return cfg, tech, batches, run_distributed(reference_trace, 1, cfg, tech, batches, steps)[0]


@pytest.fixture(scope="module")
def baseline():
    return _reference(TechniquesConfig())


@pytest.fixture(scope="module")
def all_five():
    return _reference(all_five_sharded())


def _check(setup, tp, pp, dp, zeros, **more):
    cfg, tech, batches, ref = setup
    overrides = {**SP, **more}
    traces = run_distributed(
        layout_trace, tp * pp * dp, cfg, tech, batches, STEPS, tp, pp, zeros, parallel_overrides=overrides, timeout=600
    )
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"sp tp{tp} pp{pp} dp{dp} zero{zero}")


def _ids(layouts):
    return [f"tp{t}-pp{p}-dp{d}" for t, p, d, _ in (getattr(x, "values", x) for x in layouts)]


SP_LAYOUTS = [  # (tp, pp, dp, ZeRO stages)
    (2, 1, 1, [0, 1, 2, 3]),
    (2, 2, 1, [1, 2]),
    (2, 1, 2, [1, 2]),
    pytest.param(4, 1, 1, [1], marks=pytest.mark.slow),  # 4 ranks on 2 cores
]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp,zeros", SP_LAYOUTS, ids=_ids(SP_LAYOUTS))
def test_sequence_parallel_matches_single_process(baseline, tp, pp, dp, zeros):
    _check(baseline, tp, pp, dp, zeros)


ALL_FIVE_LAYOUTS = [
    (2, 1, 1, [1, 3]),
    (2, 2, 1, [0, 2]),
    (4, 1, 1, [1]),  # shards of 4 tokens = LCM's K: the halo is a whole shard
    pytest.param(4, 2, 1, [1], marks=pytest.mark.slow),  # 8 ranks on 2 cores
]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp,zeros", ALL_FIVE_LAYOUTS, ids=_ids(ALL_FIVE_LAYOUTS))
def test_all_techniques_under_sequence_parallel_match_single_process(all_five, tp, pp, dp, zeros):
    _check(all_five, tp, pp, dp, zeros)


@pytest.mark.distributed
def test_sequence_parallel_with_virtual_stages_matches_single_process(all_five):
    """Both scale features together: TP2 with SP × PP2 with two model chunks per rank, all five on."""
    _check(all_five, 2, 2, 1, [1], virtual_stages=2)


@pytest.mark.distributed
def test_sequence_parallel_with_checkpointing_and_grouped_query_attention():
    """Activation checkpointing recomputes the sub-blocks (and their all-gathers); two key/value heads
    over two TP ranks."""
    _check(_reference(all_five_sharded(), activation_checkpointing=True, num_kv_heads=2), 2, 1, 1, [1])


# ------------------------------------------------------------------ mutations (run inside the ranks)
def unsynced_replicated_grads(sharded) -> None:
    """The norms' and techniques' gradients stay this rank's partial sums."""
    for handle in sharded.module.sequence_grad_hooks:
        handle.remove()


def halo_of_zeros(sharded) -> None:
    """LCM's anchor never sees the preceding shard's rows (the collective still runs)."""
    from loom.model.parallel.sequence import SequenceShards

    previous_rows = SequenceShards.previous_rows
    SequenceShards.previous_rows = lambda self, shard, rows: previous_rows(self, shard, rows) * 0


def no_scr_carry(sharded) -> None:
    """SCR's prefix sums restart at every shard boundary (the collective still runs)."""
    from loom.techniques.scr import SCR

    carry = SCR._carry_from_earlier_shards
    SCR._carry_from_earlier_shards = lambda self, *args: carry(self, *args) * 0


def unshared_aux_losses(sharded) -> None:
    """Every shard's per-token-mean auxiliary losses count in full instead of as its share."""
    from loom.model.context import ForwardContext

    ForwardContext.token_share = property(lambda self: 1.0)


def _control_and_mutated(rank, world_size, mutate, *args, **kwargs):
    control = layout_trace(rank, world_size, *args, **kwargs)
    return control, layout_trace(rank, world_size, *args, mutate=mutate, **kwargs)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mutate", [unsynced_replicated_grads, halo_of_zeros, no_scr_carry, unshared_aux_losses], ids=lambda f: f.__name__
)
def test_sequence_parallel_bugs_are_caught(all_five, mutate):
    cfg, tech, batches, ref = all_five
    per_rank = run_distributed(
        _control_and_mutated, 2, mutate, cfg, tech, batches, STEPS, 2, 1, [1], parallel_overrides=SP, timeout=600
    )
    for control, mutated in per_rank:
        assert_traces_match(ref, control[1], what="control")
        with pytest.raises(TraceMismatch) as caught:
            assert_traces_match(ref, mutated[1], what="mutated")
        assert any(f.startswith("step 0 gradient of") for f in caught.value.failures), caught.value.failures
