"""Technique knobs the all-five equivalence test leaves at their defaults, trained at TP/PP layouts against
the single-process model: LCM's smoothness loss and CMR's reconstruction loss (auxiliary losses injected
mid-pipeline, so their backward scale must match the main loss's), SCR's recency decay (a decayed scan whose
rho crosses the stage boundary), and SCR's relevance noise (a training-time draw every TP rank must make
alike, or the replicated parameters drift apart)."""

import dataclasses

import pytest
import torch

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


def _aux_losses() -> TechniquesConfig:
    tech = all_techniques()
    tech.lcm.aux_smooth_weight = 0.5
    tech.cmr.rec_loss_weight = 0.5
    return dataclasses.replace(tech, sca=dataclasses.replace(tech.sca, enabled=False), hcma=TechniquesConfig().hcma)


def _scr(**knobs) -> TechniquesConfig:
    tech = TechniquesConfig()
    tech.scr = dataclasses.replace(all_techniques().scr, layers="all", **knobs)  # rho crosses the PP boundary
    return tech


def _seeded(fn):
    """Start every rank and the reference from the same RNG state (the relevance noise draws from it)."""

    def run(rank, world_size, *args, **kwargs):
        torch.manual_seed(1234)
        return fn(rank, world_size, *args, **kwargs)

    return run


def _reference(rank, world_size, *args):
    return _seeded(reference_trace)(rank, world_size, *args)


def _layout(rank, world_size, *args, **kwargs):
    return _seeded(layout_trace)(rank, world_size, *args, **kwargs)


CASES = {
    "lcm-cmr-aux-losses": (_aux_losses, [(2, 2)]),
    "scr-decay": (lambda: _scr(decay=0.8), [(2, 1), (1, 2)]),
    "scr-noise": (lambda: _scr(relevance_noise="concrete(0.5)"), [(2, 1)]),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_knob_matches_single_process(case):
    make, layouts = CASES[case]
    cfg, tech = tiny_model(), make()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(_reference, 1, cfg, tech, steps, STEPS)[0]
    # the knob is live: the same run without it trains differently
    plain = {
        "lcm-cmr-aux-losses": lambda t: dataclasses.replace(
            t,
            lcm=dataclasses.replace(t.lcm, aux_smooth_weight=0.0),
            cmr=dataclasses.replace(t.cmr, rec_loss_weight=0.0),
        ),
        "scr-decay": lambda t: dataclasses.replace(t, scr=dataclasses.replace(t.scr, decay=1.0)),
        "scr-noise": lambda t: dataclasses.replace(t, scr=dataclasses.replace(t.scr, relevance_noise="none")),
    }[case](tech)
    without = run_distributed(_reference, 1, cfg, plain, steps, 2)[0]
    assert without.losses[1] != ref.losses[1], f"{case}: the knob changes nothing"
    for tp, pp in layouts:
        traces = run_distributed(_layout, tp * pp, cfg, tech, steps, STEPS, tp, pp, [1], timeout=600)
        for rank_traces in traces:
            for zero, trace in rank_traces.items():
                assert_traces_match(ref, trace, what=f"{case} tp{tp} pp{pp} zero{zero}")
