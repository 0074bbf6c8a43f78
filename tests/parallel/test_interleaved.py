"""The interleaved 1F1B schedule (`parallel.virtual_stages`): every layout with model chunks reproduces the
single-process model like any other layout (losses, grad norms, every gradient, the updated weights), and
the schedule itself: its order, its slots, and the rule on the number of micro-batches."""

import pytest

from loom.model.parallel.pipeline_interleaved import BACKWARD, FORWARD, rank_order, slot_plan
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

STEPS = 3
GLOBAL_MICROBATCHES = 4  # per step, split over DP ranks: 2 or 4 per rank, a multiple of the pipeline

LAYOUTS = [  # (tp, pp, dp, virtual_stages, num_layers): 1 block per chunk
    (1, 2, 1, 2, 4),
    (2, 2, 1, 2, 4),
    (1, 2, 2, 2, 4),
    (1, 4, 1, 2, 8),  # 4 ranks on 2 cores: about 10 s
]


def _references(num_layers: int, tech: TechniquesConfig, cache: dict):
    key = (num_layers, id(tech))
    if key not in cache:
        cfg = tiny_model(num_layers=num_layers)
        steps = [fixed_batches(GLOBAL_MICROBATCHES, cfg.vocab_size, seed=s) for s in range(2)]
        cache[key] = cfg, steps, run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    return cache[key]


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,dp,vp,layers",
    LAYOUTS,
    ids=[f"tp{t}-pp{p}-dp{d}-vp{v}-L{n}" for t, p, d, v, n in LAYOUTS],
)
def test_interleaved_layout_matches_single_process(references, tp, pp, dp, vp, layers):
    tech = TechniquesConfig()
    cfg, steps, ref = _references(layers, tech, references)
    traces = run_distributed(
        layout_trace,
        tp * pp * dp,
        cfg,
        tech,
        steps,
        STEPS,
        tp,
        pp,
        [0, 1, 2],
        parallel_overrides={"virtual_stages": vp},
        timeout=900,
    )
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"tp{tp} pp{pp} dp{dp} vp{vp} zero{zero}")
    assert ref.grad_norms[0] > 0.05, "clipping must be active for the grad-norm check to mean anything"


ALL_TECHNIQUES = all_techniques()


@pytest.mark.distributed
@pytest.mark.parametrize("pp,layers,zeros", [(2, 4, [1, 2]), (4, 8, [1])], ids=["pp2-vp2-L4", "pp4-vp2-L8"])
def test_interleaved_with_every_technique_matches_single_process(references, pp, layers, zeros):
    """SCR's ρ and CMR's bank cross every chunk boundary, the last rank → rank 0 hand-over included;
    CMR's stage-local plan is per chunk (tests/techniques/test_stage_local.py covers that plan)."""
    cfg, steps, ref = _references(layers, ALL_TECHNIQUES, references)
    traces = run_distributed(
        layout_trace,
        pp,
        cfg,
        ALL_TECHNIQUES,
        steps,
        STEPS,
        1,
        pp,
        zeros,
        parallel_overrides={"virtual_stages": 2},
        timeout=900,
    )
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"all techniques pp{pp} vp2 zero{zero}")


# ----------------------------------------------------------------------------------------- the schedule
def _recording_schedule(rank, world_size, microbatches: int, interleaved: bool) -> list:
    """The order one rank runs its forwards and backwards in, through the real schedule code."""
    import torch

    from loom.model.parallel.pipeline import forward_backward_1f1b
    from loom.model.parallel.pipeline_interleaved import forward_backward_interleaved
    from tests.parallel.common import init_layout

    init_layout(rank, 1, world_size)
    from megatron.core import parallel_state as ps

    events = []
    weight = torch.ones((), requires_grad=True)
    specs = {"hidden": ((2,), torch.float32)}
    last = rank == world_size - 1

    def stage_forward(mb, received, chunk=0):
        events.append((FORWARD, mb, chunk))
        h = (received["hidden"] if received is not None else torch.ones(2)) * weight
        return h.sum() if last else {"hidden": h}

    def backward(tensors, grads):
        events.append((BACKWARD,))
        torch.autograd.backward(tensors, grad_tensors=grads)

    group = ps.get_pipeline_model_parallel_group()
    batches = list(range(microbatches))
    if interleaved:
        forward_backward_interleaved(stage_forward, batches, group, specs, torch.device("cpu"), 1, backward=backward)
    else:
        forward_backward_1f1b(stage_forward, batches, group, specs, torch.device("cpu"), backward=backward)
    return events


@pytest.mark.distributed
@pytest.mark.parametrize("pp,microbatches", [(2, 3), (4, 6)])
def test_one_chunk_runs_in_todays_1f1b_order(pp, microbatches):
    """With one chunk per rank the interleaved code runs exactly the non-interleaved 1F1B order."""
    today = run_distributed(_recording_schedule, pp, microbatches, False)
    interleaved = run_distributed(_recording_schedule, pp, microbatches, True)
    assert interleaved == today
    for rank, events in enumerate(today):  # and `rank_order` states that order
        assert [e[0] for e in events] == [w.kind for w in rank_order(pp, rank, microbatches, 1)]
        assert [e[1] for e in events if e[0] == FORWARD] == list(range(microbatches))


@pytest.mark.parametrize("pp,microbatches,vp", [(2, 4, 1), (4, 8, 1), (2, 4, 2), (4, 4, 2), (4, 8, 2), (2, 6, 3)])
def test_slot_plan_has_the_bubble_theory_predicts(pp, microbatches, vp):
    """With forward and backward one slot each, the plan's idle fraction is (p-1)/(v·m+p-1) (v chunk-sized
    slots per stage-sized one): the interleaved order fills and drains the pipeline one chunk at a time."""
    plan = slot_plan(pp, microbatches, vp)
    slots = len(plan[0])
    assert all(len(rank_slots) == slots for rank_slots in plan)
    busy = 2 * microbatches * vp
    assert (slots - busy) / slots == pytest.approx((pp - 1) / (vp * microbatches + pp - 1))
    for rank, rank_slots in enumerate(plan):
        work = [slot.work for slot in rank_slots if slot.work is not None]
        assert work == rank_order(pp, rank, microbatches, vp)
        assert sorted((w.kind, w.microbatch, w.chunk) for w in work) == sorted(
            (kind, mb, c) for kind in (FORWARD, BACKWARD) for mb in range(microbatches) for c in range(vp)
        )


@pytest.mark.parametrize("pp,microbatches,vp", [(2, 4, 2), (4, 8, 2), (3, 6, 3)])
def test_every_message_is_received_in_the_slot_it_is_sent(pp, microbatches, vp):
    plan = slot_plan(pp, microbatches, vp)
    for t in range(len(plan[0])):
        sent = {(r, m.peer, m.kind, m.microbatch, m.chunk) for r in range(pp) for m in plan[r][t].sends}
        received = {(m.peer, r, m.kind, m.microbatch, m.chunk) for r in range(pp) for m in plan[r][t].recvs}
        assert sent == received
        for r in range(pp):  # at most one message per direction of a pair and slot: no order to agree on
            peers = [m.peer for m in plan[r][t].sends]
            assert len(peers) == len(set(peers))


def test_interleaving_needs_microbatches_a_multiple_of_the_pipeline():
    with pytest.raises(ValueError, match="micro-batches a multiple of the pipeline size"):
        rank_order(4, 0, 6, 2)
    with pytest.raises(ValueError, match="micro-batches a multiple of the pipeline size"):
        slot_plan(2, 3, 2)
    assert len(rank_order(4, 0, 6, 1)) == 12  # without interleaving any number works
