"""Resuming a checkpoint at another TP, PP or chunk count stops with one line naming the fix (a start point
from `loom convert reshard`), before DeepSpeed's loader fails on missing keys."""

from pathlib import Path

import pytest

from loom.launch.checkpoint import store
from loom.launch.checkpoint.errors import CheckpointError
from loom.model.parallel.groups import Layout


@pytest.fixture
def live_tp2_pp2(monkeypatch):
    layout = Layout(world_size=4, rank=0, tp=2, pp=2, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    monkeypatch.setattr("loom.model.parallel.groups.current_layout", lambda: layout)


@pytest.mark.parametrize(
    "saved,chunks",
    [({"tp": 1, "pp": 2}, 1), ({"tp": 2, "pp": 4}, 1), ({"tp": 2, "pp": 2, "vp": 2}, 1), ({"tp": 2, "pp": 2}, 2)],
)
def test_another_model_parallel_layout_is_refused(live_tp2_pp2, saved, chunks):
    with pytest.raises(CheckpointError, match="loom convert reshard ckpt OUT --tensor 2 --pipeline 2") as caught:
        store._require_same_model_parallel_layout({"layout": {**saved, "dp": 1, "zero": 1}}, Path("ckpt"), chunks)
    assert "\n" not in str(caught.value)


def test_the_same_layout_passes(live_tp2_pp2):
    store._require_same_model_parallel_layout({"layout": {"tp": 2, "pp": 2, "dp": 4, "zero": 2}}, Path("ckpt"), 1)
    store._require_same_model_parallel_layout({"layout": {"tp": 2, "pp": 2, "vp": 2}}, Path("ckpt"), 2)
