"""The distributed harness must surface a failing rank, not hide it."""

import pytest
import torch
import torch.distributed as dist

from tests.harness import DistributedTestError, run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _rank_one_raises(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    return rank


def _rank_one_dies(rank, world_size):
    import os

    if rank == 1:
        os._exit(3)
    return rank


def test_harness_returns_per_rank_results():
    assert run_distributed(_all_reduce_rank, 2) == [3.0, 3.0]


def test_harness_fails_when_one_rank_raises():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank_one_raises, 2, timeout=60)
    assert "rank 1 raised ValueError: boom from rank one" in str(info.value)
    assert "Traceback" in str(info.value)


def test_harness_fails_when_one_rank_dies():
    with pytest.raises(DistributedTestError, match="rank 1"):
        run_distributed(_rank_one_dies, 2, timeout=60)
