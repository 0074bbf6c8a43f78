"""`loom train` with `parallel.sequence_parallel`: the same losses as without it (all five techniques on),
the end-of-run sample decodes, and its checkpoints resume without sequence parallelism and at TP=1
(SP changes where activations live, not the weights or the optimizer state)."""

import shutil

import pytest

from loom.launch.convert.reshard import reshard
from tests.e2e.runner import TINY, read_scalars, run_loom
from tests.e2e.test_train import ALL_FIVE

COMMON = ["train.max_steps=6", "checkpoint.every=3", "train.log_every=1", "train.eval_every=0", *ALL_FIVE]


def _losses(run_dir) -> dict[int, float]:
    return read_scalars(run_dir / "tensorboard")["train/loss"]


@pytest.mark.slow
def test_sequence_parallel_run_matches_and_resumes_without_it(tmp_path):
    sharded = tmp_path / "sp"
    out = run_loom(
        [
            "train",
            TINY,
            f"output_dir={sharded}",
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            *COMMON,
            "train.sample_prompt=To be",
            "train.sample_tokens=4",
        ],
        nproc=2,
    )
    assert "sample: 'To be'" in out.stdout
    plain = tmp_path / "plain"
    run_loom(["train", TINY, f"output_dir={plain}", "parallel.tensor=2", *COMMON], nproc=2)
    want = _losses(plain)
    for step, loss in _losses(sharded).items():
        assert loss == pytest.approx(want[step], rel=1e-5), f"step {step}: SP {loss} vs without SP {want[step]}"

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    out = run_loom(["train", TINY, f"output_dir={resumed}", "parallel.tensor=2", *COMMON, "--resume", "auto"], nproc=2)
    assert "at step 3" in out.stdout
    got = _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}: resumed {got[step]} vs {want[step]}"

    # another TP size: a clear refusal, then the way it names (a start point re-sliced for TP=1)
    checkpoint = sharded / "checkpoints" / "step_00000003"
    refused = run_loom(
        ["train", TINY, f"output_dir={tmp_path / 'tp1'}", *COMMON, "--resume", str(checkpoint)], check=False
    )
    assert refused.returncode != 0 and "loom convert reshard" in refused.stdout + refused.stderr
    reshard(checkpoint, tmp_path / "start", tensor=1, pipeline=1)
    out = run_loom(["train", TINY, f"output_dir={tmp_path / 'tp1'}", *COMMON, "--resume", str(tmp_path / "start")])
    assert "resumed from start point" in out.stdout and "step 6/6" in out.stdout
