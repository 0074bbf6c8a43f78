"""Checkpoints shared by the conversion tests, written once per session by the real CLI (torchrun)
or, where the CLI cannot reach a layout on this machine, by forked gloo ranks + `checkpoint.save`."""

from __future__ import annotations

import pytest

from tests.convert.common import HARNESS_OVERRIDES, TECHNIQUES, fixed_batches, layout_run_fn
from tests.e2e.runner import TINY, run_loom

SHORT = ["train.max_steps=2", "checkpoint.every=2", "train.eval_every=0", "train.log_every=1", "optim.warmup_steps=1"]


def _cli_checkpoint(tmp_path_factory, name: str, nproc: int, extra: list[str]) -> str:
    run = tmp_path_factory.mktemp(name)
    run_loom(["train", TINY, f"output_dir={run}", *SHORT, *extra], nproc=nproc)
    return str(run / "checkpoints" / "step_00000002")


@pytest.fixture(scope="session")
def ckpt_tp2_pp2(tmp_path_factory) -> str:
    """TP=2 × PP=2, ZeRO-1, tied embeddings (the last stage's copy is dropped on export)."""
    return _cli_checkpoint(
        tmp_path_factory,
        "tp2pp2",
        4,
        ["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1", "model.tie_embeddings=true"],
    )


@pytest.fixture(scope="session")
def ckpt_techniques(tmp_path_factory) -> str:
    """PP=2 with LCM, SCR, CMR, SCA and HCMA on, trained 2 steps so LCM/SCR/CMR are no longer the identity."""
    return _cli_checkpoint(tmp_path_factory, "tech", 2, ["parallel.pipeline=2", *TECHNIQUES])


@pytest.fixture(scope="session")
def tokenizer_model(ckpt_tp2_pp2) -> str:
    return f"{ckpt_tp2_pp2}/tokenizer.model"


def _harness_checkpoint(tmp_path_factory, name, tokenizer, world, tp, pp, zero) -> tuple[str, dict]:
    """A real checkpoint (`launch.checkpoint.save`) from forked gloo ranks, and its live full weights.
    Cheaper than torchrun on 2 cores, and the live weights come back for the comparison. (`loom train` itself
    trains and resumes ZeRO-3 with DP > 1 too: tests/e2e/test_cli_claims.py.)"""
    from tests.harness import run_distributed

    run = tmp_path_factory.mktemp(name)
    out = run_distributed(
        layout_run_fn,
        world,
        HARNESS_OVERRIDES,
        tp,
        pp,
        zero,
        fixed_batches(4),
        save_dir=str(run),
        tokenizer=tokenizer,
        train_steps=2,
    )
    return str(run / "checkpoints" / "step_00000002"), out[0]["weights"]


@pytest.fixture(scope="session")
def ckpt_dp2_zero2(tmp_path_factory, tokenizer_model) -> tuple[str, dict]:
    """DP=2, ZeRO-2: the fp32 masters are split over two data-parallel partitions."""
    return _harness_checkpoint(tmp_path_factory, "dp2z2", tokenizer_model, 2, 1, 1, 2)


@pytest.fixture(scope="session")
def ckpt_zero3(tmp_path_factory, tokenizer_model) -> tuple[str, dict]:
    """TP=2 × DP=2, ZeRO-3: every parameter partitioned over DP inside each TP shard."""
    return _harness_checkpoint(tmp_path_factory, "z3", tokenizer_model, 4, 2, 1, 3)
