"""Every TP×PP×DP layout (world ≤ 4) and ZeRO stage reproduces the single-process model: per-step
loss, global grad norm (with clipping active), every gradient and the updated weights (in float64
where DeepSpeed allows it, so the bounds hold on any CPU; `tests/parallel/traces.py`)."""

import pytest

from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import assert_traces_match, fixed_batches, layout_trace, reference_trace, tiny_model

STEPS = 3
GLOBAL_MICROBATCHES = 4  # per step, split over DP ranks

LAYOUTS = [  # (tp, pp, dp)
    (1, 1, 1),
    (2, 1, 1),
    (1, 2, 1),
    (1, 1, 2),
    pytest.param(4, 1, 1, marks=pytest.mark.slow),  # 4 ranks on 2 cores; TP is also covered by tp2
    (1, 4, 1),
    (2, 2, 1),
    (2, 1, 2),
    (1, 2, 2),
]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_model()
    tech = TechniquesConfig()
    steps = [fixed_batches(GLOBAL_MICROBATCHES, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]
    return cfg, tech, steps, ref


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,dp", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}" for t, p, d in (getattr(x, "values", x) for x in LAYOUTS)]
)
def test_layout_matches_single_process(setup, tp, pp, dp):
    cfg, tech, steps, ref = setup
    stages = [0, 1, 2] + ([3] if pp == 1 else [])
    traces = run_distributed(layout_trace, tp * pp * dp, cfg, tech, steps, STEPS, tp, pp, stages, timeout=600)
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"tp{tp} pp{pp} dp{dp} zero{zero}")
    assert ref.grad_norms[0] > 0.05, "clipping must be active for the grad-norm check to mean anything"
