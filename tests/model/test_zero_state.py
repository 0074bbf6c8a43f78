"""One test per DeepSpeed internal the adapter (`loom.model.parallel.zero_state`) relies on: after a
DeepSpeed upgrade, the failing test names the internal that moved, instead of a run going wrong."""

from __future__ import annotations

import inspect

import pytest

from loom.model.parallel.zero_state import INTERNALS
from tests.harness import run_distributed


def _engine_facts(rank, world, zero: int, pp: int) -> dict:
    """Build a tiny ZeRO engine on this gloo group and report which internals exist on its objects."""
    import torch

    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.optim import OptimConfig
    from loom.model.parallel.parallelize import parallelize
    from loom.techniques.config import TechniquesConfig
    from tests.parallel.common import MICRO_BATCH, SEQ, fixed_batches, init_layout, tiny_model

    layout = init_layout(rank, 1, pp)
    parallel = ParallelConfig(pipeline=pp, zero_stage=zero, microbatches=2)
    sharded = parallelize(
        tiny_model(),
        TechniquesConfig(),
        layout,
        parallel,
        optim=OptimConfig(),
        micro_batch_size=MICRO_BATCH,
        seed=0,
        precision="fp32",
    )
    specs = sharded.module.carry_specs(MICRO_BATCH, SEQ, torch.float32)
    sharded.train_step(fixed_batches(2, 500), 0, specs)
    opt = sharded.engine.optimizer
    param = next(sharded.module.parameters())
    facts = {name: hasattr(opt, name) or hasattr(param, name) for name in INTERNALS}
    facts["_hp_mapping_fields"] = (
        all(
            hasattr(param._hp_mapping, a)
            for a in ("lp_fragment_address", "get_hp_fragment_address", "param_group_index")
        )
        if getattr(param, "_hp_mapping", None) is not None
        else None
    )
    sharded.engine.destroy()
    return facts


@pytest.fixture(scope="module")
def zero_facts():
    return {
        (zero, pp): run_distributed(_engine_facts, 2 * pp, zero, pp, timeout=300)[0]
        for zero, pp in ((1, 1), (2, 1), (3, 1), (2, 2))
    }


WHERE = {  # internal -> the (ZeRO stage, PP) engine that must have it
    "ds_id": (3, 1),
    "ds_shape": (3, 1),
    "ds_tensor": (3, 1),
    "ds_process_group": (3, 1),
    "_z3_optimizer": (3, 1),
    "_get_fp32_opt_state_partition": (3, 1),
    "_get_param_partition_rank": (3, 1),
    "fp32_partitioned_groups_flat": (3, 1),
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition": (3, 1),
    "_hp_mapping": (1, 1),
    "single_partition_of_fp32_groups": (1, 1),
    "averaged_gradients": (1, 1),
    "ipg_buckets": (2, 2),
    "set_gradient_accumulation_boundary": (2, 2),
    "overlapping_partition_gradients_reduce_epilogue": (2, 2),
    "grads_in_partition": (2, 1),
    "reduce_gradients": (1, 1),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(WHERE))
def test_deepspeed_internal_exists(zero_facts, name):
    zero, pp = WHERE[name]
    assert zero_facts[(zero, pp)][name], f"DeepSpeed's ZeRO-{zero} engine (PP {pp}) no longer has {name}"


@pytest.mark.distributed
def test_zero12_fragment_mapping_fields(zero_facts):
    assert zero_facts[(1, 1)]["_hp_mapping_fields"], "ZeRO-1/2's _hp_mapping lost its fragment-address fields"


def test_bf16_zero0_master_groups_exist():
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    source = inspect.getsource(FP16_UnfusedOptimizer.__init__)
    assert "self.fp16_groups" in source and "self.fp32_groups" in source


def test_zero3_leaf_marker():
    import torch
    from deepspeed.utils import set_z3_leaf_module, z3_leaf_module

    module = torch.nn.Linear(2, 2)
    set_z3_leaf_module(module, True)
    assert z3_leaf_module(module) and getattr(module, "_z3_leaf", False)


def test_every_internal_is_tested():
    covered = set(WHERE) | {"fp16_groups", "fp32_groups", "_z3_leaf"}
    assert set(INTERNALS) == covered, set(INTERNALS) ^ covered
