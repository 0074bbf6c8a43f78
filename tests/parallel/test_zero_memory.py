"""ZeRO really shards on this machine: per-rank tensor bytes, not RSS (which hides it at this size)."""

import math
import os

import pytest
import torch

from loom.model.parallel.config import ParallelConfig
from loom.model.parallel.zero_state import local_shape
from loom.techniques.config import TechniquesConfig
from tests.harness import run_distributed
from tests.parallel.common import MICRO_BATCH, OPTIM, fixed_batches, init_layout, tiny_model


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors if torch.is_tensor(t))


def _held_per_rank(rank, world_size):
    from loom.model.parallel.parallelize import parallelize

    layout = init_layout(rank, 1, 1)
    cfg = tiny_model(hidden_size=128, ffn_hidden_size=256)
    batch = fixed_batches(1, cfg.vocab_size)[0]
    out = {}
    for zero in (0, 1, 2, 3):
        sharded = parallelize(
            cfg,
            TechniquesConfig(),
            layout,
            ParallelConfig(zero_stage=zero, microbatches=2),
            optim=OPTIM,
            micro_batch_size=MICRO_BATCH,
            seed=0,
            precision="fp32",
        )
        engine = sharded.engine
        params = list(engine.module.parameters())
        full = sum(math.prod(local_shape(p)) for p in params)
        held_params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        engine.backward(engine(batch))  # first of two micro-steps: not a boundary
        held_grads = _numel(p.grad for p in params)
        engine.step()
        engine.backward(engine(batch))
        engine.step()  # the boundary: optimizer state now exists
        base = engine.optimizer if zero == 0 else engine.optimizer.optimizer
        state = _numel(v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
        out[zero] = dict(full=full, params=held_params, grads=held_grads, adam=state)
        engine.destroy()
    return out


@pytest.mark.distributed
def test_per_rank_bytes_shrink_with_zero_stage():
    per_rank = run_distributed(_held_per_rank, 2)
    for held in per_rank:
        full = held[0]["full"]
        near = lambda value, target: abs(value - target) <= 0.02 * target + 64  # alignment padding
        assert near(held[0]["adam"], 2 * full) and near(held[0]["grads"], full) and held[0]["params"] == full
        assert near(held[1]["adam"], full), "ZeRO-1 must halve Adam's moments on DP=2"
        assert near(held[1]["grads"], full), "ZeRO-1 keeps full gradients between micro-steps"
        assert near(held[2]["adam"], full) and held[2]["grads"] == 0, "ZeRO-2 keeps no full gradients"
        assert near(held[3]["adam"], full) and near(held[3]["params"], full / 2), "ZeRO-3 halves parameters"


def _zero_run_without_jit(rank, world_size, ext_dir):
    from loom.model.parallel.parallelize import parallelize

    layout = init_layout(rank, 1, 1)
    cfg = tiny_model()
    for zero in (1, 2, 3):
        sharded = parallelize(
            cfg,
            TechniquesConfig(),
            layout,
            ParallelConfig(zero_stage=zero),
            optim=OPTIM,
            micro_batch_size=MICRO_BATCH,
            seed=0,
            precision="fp32",
        )
        sharded.train_step(
            fixed_batches(1, cfg.vocab_size), 0, sharded.module.carry_specs(MICRO_BATCH, 16, torch.float32)
        )
        sharded.engine.destroy()
    return sorted(os.listdir(ext_dir))


@pytest.mark.distributed
def test_no_deepspeed_jit_builds(tmp_path, monkeypatch):
    """DeepSpeed's CPU ops cost 2-4 minutes of C++ compilation each; Loom must never trigger one."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert run_distributed(_zero_run_without_jit, 2, str(tmp_path)) == [[], []]
    assert os.listdir(tmp_path) == []
