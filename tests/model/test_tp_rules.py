"""The tensor-parallel split table agrees with the megatron-core layers that hold the weights, and its
cut/merge round trip is exact (including the vocabulary padding)."""

from __future__ import annotations

import pytest
import torch

from loom.model.parallel.tp_rules import SPLIT_RULES, local_slice, partition_dim, rule_for
from tests.harness import run_distributed


def _layer_dims(rank, world) -> dict:
    """name → split dim implied by the megatron layer type, for every weight of a model with all techniques."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    from loom.model.parallel.parallelize import build_stage
    from tests.parallel.common import all_techniques, init_layout, tiny_model

    layout = init_layout(rank, 2, 1)
    stage = build_stage(tiny_model(tie_embeddings=False), all_techniques(), layout, seed=0)
    by_type = {ColumnParallelLinear: 0, RowParallelLinear: 1, VocabParallelEmbedding: 0}
    dims = {}
    for module_name, module in stage.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            dims[name] = by_type.get(type(module))
    tagged = {
        n: getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
        for n, p in stage.named_parameters()
    }
    return {"by_layer": dims, "tagged": tagged}


@pytest.mark.distributed
def test_table_matches_the_megatron_layers():
    out = run_distributed(_layer_dims, 2)[0]
    for name, dim in out["by_layer"].items():
        assert partition_dim(name) == dim, f"{name}: table says {partition_dim(name)}, its layer splits dim {dim}"
        assert out["tagged"][name] == dim, f"{name} is tagged {out['tagged'][name]}, expected {dim}"
    matched = {rule.pattern for name in out["by_layer"] for rule in [rule_for(name)] if rule is not None}
    assert matched == {rule.pattern for rule in SPLIT_RULES}, "a rule matches no weight of the model"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_cut_and_merge_round_trip(tp):
    full = torch.randn(10, 6)  # 10 real vocabulary rows, padded to 12 at TP 4 / 10 at TP 2
    padded_rows = -(-10 // tp) * tp if tp > 1 else 10
    local = (padded_rows // tp, 6)
    pieces = [local_slice("embedding.weight", full, local, tp, r) for r in range(tp)]
    merged = torch.cat(pieces)[:10]
    assert torch.equal(merged, full)
    assert all(p.shape == local for p in pieces)
    proj = torch.randn(6, 8)
    cols = [local_slice("layers.3.attention.proj.weight", proj, (6, 8 // tp), tp, r) for r in range(tp)]
    assert torch.equal(torch.cat(cols, dim=1), proj)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        local_slice("layers.0.mlp.down.weight", torch.zeros(4, 6), (4, 4), 2, 0)
