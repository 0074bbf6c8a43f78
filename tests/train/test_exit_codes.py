"""Exit codes of the training loop when checkpoint saves fail (checkpoint.on_save_error), with a stand-in
model and save function in one gloo process: 0 only when every step ran and the final checkpoint exists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.harness import run_distributed
from tests.logs import captured_lines


def _train_fn(rank, world_size, max_steps: int, every: int, stop_on_error: bool, failing: list[tuple[int, int]]):
    """Train `max_steps` stand-in steps; the save attempts listed in `failing` as (step, attempt) fail."""
    from loom.launch.checkpoint.store import CheckpointError
    from loom.launch.train.callbacks import CheckpointCallback
    from loom.launch.train.trainer import Trainer, TrainState

    class Module:
        def train_batch(self, batches, step, lr):
            return {"train/loss": 1.0, "train/grad_norm": 1.0, "train/lr": lr, "finite": True}

    attempts: dict[int, int] = {}
    saved: list[int] = []

    def save(trainer):
        step = trainer.state.step
        attempts[step] = attempts.get(step, 0) + 1
        if (step, attempts[step]) in failing:
            raise CheckpointError(f"checkpoint save failed while writing .tmp-step_{step:08d}: disk full")
        saved.append(step)
        return f"step_{step:08d}"

    cfg = SimpleNamespace(
        train=SimpleNamespace(max_steps=max_steps, max_minutes=0.0, max_consecutive_nonfinite=5),
        parallel=SimpleNamespace(microbatches=1),
        optim=SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=1, schedule="cosine"),
    )
    callbacks = [CheckpointCallback(every, save, stop_on_error=stop_on_error)]
    trainer = Trainer(cfg, Module(), iter(range(10**6)), TrainState(), callbacks, tokens_per_step=1)
    with captured_lines() as log:
        code = trainer.fit()
    return {"code": code, "step": trainer.state.step, "saved": saved, "errors": [x for x in log if "error:" in x]}


# (on_save_error, failing save attempts (step, attempt), exit code, steps trained, checkpoints saved)
CASES = [
    ("continue", [], 0, 6, [2, 4, 6]),
    ("continue", [(2, 1)], 0, 6, [4, 6]),  # mid-run failure: trains on, saves later
    ("stop", [(2, 1), (2, 2)], 4, 2, []),  # mid-run failure: stops at once (the stop's own save fails too)
    ("stop", [(2, 1)], 4, 2, [2]),  # stops at once even when the stop's save works
    ("continue", [(6, 1), (6, 2)], 4, 6, [2, 4]),  # the final checkpoint is missing
    ("stop", [(6, 1), (6, 2)], 4, 6, [2, 4]),
    ("continue", [(6, 1)], 0, 6, [2, 4, 6]),  # the periodic save of the last step failed, the final one worked
]


@pytest.mark.parametrize("policy,failing,code,trained,saved", CASES)
def test_exit_code_after_failed_saves(policy, failing, code, trained, saved):
    (out,) = run_distributed(_train_fn, 1, 6, 2, policy == "stop", failing)
    assert (out["code"], out["step"], out["saved"]) == (code, trained, saved), out
    assert len(out["errors"]) == len(failing), out  # every failed attempt is reported
