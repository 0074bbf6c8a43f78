"""HCMA offline mode inside a ZeRO run: the aligned table must reach DeepSpeed's fp32 master
weights (else the next optimizer step silently reverts it) and a tied output copy on the last stage."""

import dataclasses

import pytest
import torch

from loom.model.parallel.config import ParallelConfig
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import MICRO_BATCH, OPTIM, SEQ, all_techniques, fixed_batches, init_layout, tiny_model


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
        dataclasses.replace(OPTIM, lr=0.0, weight_decay=0.0),
        MICRO_BATCH,
        seed=0,
        precision="fp32",
    )
    module = sharded.module
    weight = module.embedding.weight if module.is_first else module.output_layer.weight
    before = weight.detach().clone()
    upkeep(sharded, layout, step=0)
    aligned = weight.detach().clone()
    master = safe_get_full_fp32_param(weight)
    sharded.train_step(fixed_batches(2, cfg.vocab_size), 0, module.carry_specs(MICRO_BATCH, SEQ, torch.float32))
    after = weight.detach().clone()
    return dict(
        changed=float((aligned - before).abs().max()),
        master_err=float((master - aligned).abs().max()),
        reverted=float((after - aligned).abs().max()),
        first=module.is_first,
        aligned=aligned,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,zero", [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)])
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
