"""`loom train` from start points: `--resume START` continues at a new layout with Adam's state, and
`model.init_from` starts a run from from-hf weights with techniques switched on. Active once
train.py has the wiring (`model.init_from` exists); skipped before."""

from __future__ import annotations

from dataclasses import fields

import pytest

from loom.launch.convert.hf_export import to_hf
from loom.launch.convert.hf_import import from_hf
from loom.launch.convert.reshard import reshard
from loom.model.config import ModelConfig
from tests.e2e.runner import run_loom

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "init_from" not in {f.name for f in fields(ModelConfig)},
        reason="model.init_from is not wired into launch/train.py yet",
    ),
]

STEPS = ["train.eval_every=0", "train.log_every=1", "data.eval_corpus=null"]


def test_resume_from_a_resharded_start_point(ckpt_tp2_pp2, tmp_path):
    start = tmp_path / "start"
    reshard(ckpt_tp2_pp2, start, tensor=1, pipeline=1)
    proc = run_loom(
        [
            "train",
            str(start / "config.yaml"),
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "checkpoint.every=3",
            *STEPS,
            "--resume",
            str(start),
        ],
        nproc=2,
    )
    assert "loaded weights and optimizer state" in proc.stdout
    assert "step 3/3" in proc.stdout and "step 1/3" not in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / "MANIFEST.json").is_file()


def test_init_from_hf_weights_with_techniques_on(ckpt_tp2_pp2, tmp_path):
    hf, start = tmp_path / "hf", tmp_path / "start"
    to_hf(ckpt_tp2_pp2, hf)
    from_hf(hf, start)
    proc = run_loom(
        [
            "train",
            str(start / "config.yaml"),
            f"output_dir={tmp_path / 'run'}",
            "data.corpus=shakespeare",
            "data.val_percent=5",
            "train.max_steps=1",
            "checkpoint.every=1",
            "parallel.tensor=2",
            "techniques.lcm.enabled=true",
            "techniques.scr.enabled=true",
            "techniques.scr.rank=8",
            "train.micro_batch_size=4",
            *STEPS,
        ],
        nproc=2,
    )
    assert "start from their identity init" in proc.stdout
    assert "loaded weights (optimizer state starts fresh)" in proc.stdout
