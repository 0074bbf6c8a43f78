"""`parallel.overlap_comm` (DeepSpeed reduces each gradient bucket from the backward hooks as it fills)
changes when gradients are reduced, not what they sum to: data parallelism under ZeRO 1 and 2 reproduces
the single-process model with it on. Where it is not supported the config refuses it."""

import pytest

from loom.model.parallel.config import ParallelConfig
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import assert_traces_match, fixed_batches, layout_trace, reference_trace, tiny_model

STEPS = 3


def _require_overlap(sharded) -> None:
    """The engine really runs DeepSpeed's overlapped path (else the comparison below proves nothing)."""
    assert sharded.engine.optimizer.overlap_comm, "overlap_comm did not reach DeepSpeed's ZeRO optimizer"


@pytest.mark.distributed
def test_overlapped_reduction_matches_single_process():
    cfg = tiny_model()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    ref = run_distributed(reference_trace, 1, cfg, TechniquesConfig(), steps, STEPS)[0]
    traces = run_distributed(
        layout_trace,
        2,
        cfg,
        TechniquesConfig(),
        steps,
        STEPS,
        1,
        1,
        [1, 2],
        mutate=_require_overlap,
        parallel_overrides={"overlap_comm": True},
        timeout=600,
    )
    for rank_traces in traces:
        for zero, trace in rank_traces.items():
            assert_traces_match(ref, trace, what=f"overlap_comm dp2 zero{zero}")


@pytest.mark.parametrize(("zero", "pipeline"), [(0, 1), (3, 1), (1, 2), (2, 2)])
def test_unsupported_layouts_are_refused(zero, pipeline):
    problems = ParallelConfig(zero_stage=zero, pipeline=pipeline, overlap_comm=True).validate(None)
    assert any("parallel.overlap_comm" in p for p in problems), problems


def test_supported_layouts_pass_validation():
    assert ParallelConfig(zero_stage=2, overlap_comm=True).validate(None) == []
