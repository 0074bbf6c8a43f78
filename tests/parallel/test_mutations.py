"""The equivalence harness catches real parallelism bugs.

Each test breaks one piece of the parallel code inside the forked ranks (after the engine is built):
a tensor-parallel all-reduce, a technique's gradient, the pipeline schedule's last micro-batch, a
ZeRO-2 gradient bucket's reduction, one ZeRO-1 partition's optimizer step. It trains the same steps as
an unbroken control run and asserts that `assert_traces_match` passes the control and raises its
TraceMismatch for the broken run. The broken run itself finishes normally (no crash, no hang), so
without the check each bug would go unnoticed.
"""

import pytest

from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import all_techniques, fixed_batches, layout_trace, reference_trace, tiny_model
from tests.parallel.traces import TraceMismatch, assert_traces_match

STEPS = 2
SCALED = "layers.1.scr.up.weight"  # a technique parameter whose gradient is live from step 0


def _reference(tech):
    cfg = tiny_model()
    steps = [fixed_batches(4, cfg.vocab_size, seed=s) for s in range(2)]
    return cfg, tech, steps, run_distributed(reference_trace, 1, cfg, tech, steps, STEPS)[0]


@pytest.fixture(scope="module")
def plain():
    return _reference(TechniquesConfig())


@pytest.fixture(scope="module")
def techniques():
    return _reference(all_techniques())


# ------------------------------------------------------------------ mutations (run inside the ranks)
def skip_row_parallel_all_reduce(sharded) -> None:
    """Layer 0's attention output projection (megatron RowParallelLinear) keeps its partial sum."""
    from megatron.core.tensor_parallel import layers

    reduce = layers.reduce_from_tensor_model_parallel_region

    def skip(module, args):
        layers.reduce_from_tensor_model_parallel_region = lambda output, group=None: output

    def restore(module, args, output):
        layers.reduce_from_tensor_model_parallel_region = reduce

    proj = sharded.module.layers["0"].attention.proj
    proj.register_forward_pre_hook(skip)
    proj.register_forward_hook(restore)


def scale_technique_gradient(sharded) -> None:
    """One technique parameter's gradient comes out 1e-3 too large."""
    param = dict(sharded.module.named_parameters())[SCALED]
    param.register_hook(lambda grad: grad * (1 + 1e-3))


def drop_last_microbatch_backward(sharded) -> None:
    """The 1F1B schedule skips the backward of the last micro-batch (every stage, so nothing hangs)."""
    from loom.model.parallel import pipeline, zero

    schedule = pipeline.forward_backward_1f1b

    def dropping_last(stage_forward, microbatches, *args, backward=pipeline._default_backward, **kwargs):
        done = [0]

        def all_but_last(tensors, grads):
            done[0] += 1
            if done[0] < len(microbatches):
                backward(tensors, grads)

        return schedule(stage_forward, microbatches, *args, backward=all_but_last, **kwargs)

    zero.forward_backward_1f1b = dropping_last


def skip_one_zero2_bucket_reduction(sharded) -> None:
    """The second gradient bucket ZeRO-2 reduces is left as this rank's own (averaged only locally)."""
    import deepspeed.comm as ds_comm

    optimizer = sharded.engine.optimizer
    average_tensor = optimizer.average_tensor
    calls = [0]

    def average_without_communication(*args, **kwargs):
        calls[0] += 1
        if calls[0] != 2:
            return average_tensor(*args, **kwargs)
        all_reduce, reduce = ds_comm.all_reduce, ds_comm.reduce
        ds_comm.all_reduce = ds_comm.reduce = lambda *a, **k: None
        try:
            return average_tensor(*args, **kwargs)
        finally:
            ds_comm.all_reduce, ds_comm.reduce = all_reduce, reduce

    optimizer.average_tensor = average_without_communication


def faster_steps_on_one_partition(sharded) -> None:
    """The second DP rank's ZeRO-1 partition steps with a 1% larger learning rate: gradients are right,
    only the optimizer is wrong, so the weight check (with its Adam term) has to see it."""
    if sharded.layout.dp_rank == 1:
        for group in sharded.engine.optimizer.param_groups:
            group["lr"] *= 1.01


def _control_and_mutated(rank, world_size, mutate, *args, **kwargs):
    control = layout_trace(rank, world_size, *args, **kwargs)
    return control, layout_trace(rank, world_size, *args, mutate=mutate, **kwargs)


def _assert_caught(setup, mutate, tp, pp, dp, zero, **kwargs) -> list:
    """Every rank: the control matches the reference and the mutated run does not; returns the failures."""
    cfg, tech, steps, ref = setup
    per_rank = run_distributed(
        _control_and_mutated, tp * pp * dp, mutate, cfg, tech, steps, STEPS, tp, pp, [zero], timeout=600, **kwargs
    )
    failures = []
    for control, mutated in per_rank:
        assert_traces_match(ref, control[zero], what="control")
        with pytest.raises(TraceMismatch) as caught:
            assert_traces_match(ref, mutated[zero], what="mutated")
        failures.append(caught.value.failures)
    return failures


@pytest.mark.distributed
def test_skipped_tensor_parallel_all_reduce_is_caught(plain):
    for failures in _assert_caught(plain, skip_row_parallel_all_reduce, tp=2, pp=1, dp=1, zero=1):
        assert any("step 0 loss" in f for f in failures), failures


@pytest.mark.distributed
def test_technique_gradient_off_by_1e_3_is_caught(techniques):
    """The step-0 gradient comparison names the one parameter whose gradient is off, and no other."""
    for failures in _assert_caught(techniques, scale_technique_gradient, tp=2, pp=1, dp=1, zero=1):
        first_step = [f for f in failures if f.startswith("step 0 gradient of")]
        assert len(first_step) == 1 and SCALED in first_step[0], failures


@pytest.mark.distributed
def test_dropped_last_microbatch_under_pipeline_is_caught(plain):
    for failures in _assert_caught(plain, drop_last_microbatch_backward, tp=1, pp=2, dp=1, zero=1):
        assert any("step 0 gradient of" in f for f in failures), failures


@pytest.mark.distributed
def test_unreduced_zero2_bucket_is_caught(plain):
    small_buckets = {"reduce_bucket_size": 20_000}  # several buckets per backward on the tiny model
    for failures in _assert_caught(
        plain, skip_one_zero2_bucket_reduction, tp=1, pp=1, dp=2, zero=2, parallel_overrides=small_buckets
    ):
        assert any("step 0 gradient of" in f for f in failures), failures


@pytest.mark.distributed
def test_optimizer_only_bug_is_caught_by_the_weight_check(plain):
    for failures in _assert_caught(plain, faster_steps_on_one_partition, tp=1, pp=1, dp=2, zero=1):
        assert not [f for f in failures if f.startswith("step 0 gradient")], failures
        assert any(f.startswith("updated weight") for f in failures), failures
