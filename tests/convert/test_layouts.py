"""Resume at another layout: TP2×PP2 → TP1×PP1 → TP4 through `reshard` start points keeps the loss
on a fixed batch and continues Adam's state, so the next step equals the uninterrupted run's."""

from __future__ import annotations

import pytest
import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.reader import load
from loom.launch.convert.reshard import reshard
from tests.convert.common import HARNESS_OVERRIDES, assert_weights_close, fixed_batches, layout_run_fn
from tests.harness import run_distributed

pytestmark = pytest.mark.slow  # every test here needs checkpoints that conftest.py trains through torchrun


def test_reshard_chain_keeps_loss_and_optimizer_state(tmp_path, tokenizer_model):
    batches = fixed_batches(4)
    # TP2 × PP2, ZeRO-1: 2 steps, checkpoint, loss on a fixed batch, then step 3 uninterrupted
    ref = run_distributed(
        layout_run_fn,
        4,
        HARNESS_OVERRIDES,
        2,
        2,
        1,
        batches,
        save_dir=str(tmp_path / "a"),
        tokenizer=tokenizer_model,
        train_steps=2,
        then_steps=1,
    )[0]
    reshard(tmp_path / "a" / "checkpoints" / "step_00000002", tmp_path / "to_tp1", tensor=1, pipeline=1)

    # TP1 × PP1, ZeRO-0: load, checkpoint right away (step 2), then step 3
    one = run_distributed(
        layout_run_fn,
        1,
        HARNESS_OVERRIDES,
        1,
        1,
        0,
        batches,
        start=str(tmp_path / "to_tp1"),
        save_dir=str(tmp_path / "b"),
        tokenizer=tokenizer_model,
        then_steps=1,
    )[0]
    assert one["step"] == 3
    assert one["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6, abs=1e-6)
    assert one["then"][0] == pytest.approx(ref["then"][0], rel=1e-6, abs=1e-6)
    assert_weights_close(ref["weights"], one["weights"], 2048, what="TP1 after step 3")

    # TP4, ZeRO-2, from the TP1 ZeRO-0 checkpoint
    reshard(tmp_path / "b" / "checkpoints" / "step_00000002", tmp_path / "to_tp4", tensor=4, zero=2)
    four = run_distributed(
        layout_run_fn, 4, HARNESS_OVERRIDES, 4, 1, 2, batches, start=str(tmp_path / "to_tp4"), then_steps=1
    )[0]
    assert four["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6, abs=1e-6)
    assert four["then"][0] == pytest.approx(ref["then"][0], rel=1e-6, abs=1e-6)
    assert_weights_close(ref["weights"], four["weights"], 2048, what="TP4 after step 3")

    # DP2, ZeRO-2 (each rank writes only its partition of the masters and moments): save right away,
    # and the checkpoint consolidates back to exactly the start point
    dp2 = run_distributed(
        layout_run_fn,
        2,
        HARNESS_OVERRIDES,
        1,
        1,
        2,
        batches,
        start=str(tmp_path / "to_tp1"),
        save_dir=str(tmp_path / "c"),
        tokenizer=tokenizer_model,
    )[0]
    assert dp2["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6, abs=1e-6)
    start, saved = load(tmp_path / "to_tp1", optimizer=True), load(tmp_path / "c", optimizer=True)
    assert saved.source["layout"]["dp"] == 2 and saved.optimizer_step == start.optimizer_step == 2.0
    for name, value in start.weights.items():
        assert torch.equal(saved.weights[name], value), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(saved.optimizer[key][name], start.optimizer[key][name]), (key, name)


def test_reshard_refuses_a_layout_the_model_cannot_take(ckpt_tp2_pp2, tmp_path):
    with pytest.raises(ConvertError, match="not divisible by parallel.tensor 3"):
        reshard(ckpt_tp2_pp2, tmp_path / "bad", tensor=3)
    with pytest.raises(ConvertError, match="ZeRO-3 with parallel.pipeline > 1"):
        reshard(ckpt_tp2_pp2, tmp_path / "bad", pipeline=2, zero=3)
    assert not (tmp_path / "bad").exists()
