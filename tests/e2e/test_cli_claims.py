"""README claims checked through the real `loom train`: `train.max_minutes` stops with a checkpoint and
exit code 75, ZeRO-3 trains and resumes at DP=2, and `train.compile=true` compiles the blocks."""

import math
import re
import shutil

import pytest

from loom.launch.checkpoint.locate import find_resumable
from loom.launch.checkpoint.manifest import verify
from tests.e2e.runner import TINY, read_scalars, run_loom

QUIET = ["train.log_every=1", "train.eval_every=0"]


@pytest.mark.slow
def test_max_minutes_stops_with_a_checkpoint_and_exit_code_75(tmp_path):
    run = tmp_path / "run"
    base = ["train", TINY, f"output_dir={run}", "checkpoint.every=0", *QUIET]
    out = run_loom([*base, "train.max_steps=100000", "train.max_minutes=0.05"], check=False)  # 3 s of training
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 75, log  # the process itself: no launcher in between
    stopped = re.search(r"finished at step (\d+) \(exit code 75\)", out.stdout)
    assert stopped, log
    step = int(stopped.group(1))
    assert 0 < step < 100000
    folder = find_resumable(run)
    assert folder is not None and folder.name == f"step_{step:08d}" and verify(folder) is None
    assert sorted(read_scalars(run / "tensorboard")["train/loss"]) == list(range(1, step + 1))
    resumed = run_loom([*base, f"train.max_steps={step + 1}", "--resume", "auto"])
    assert f"resumed from {folder}" in resumed.stdout and f"finished at step {step + 1} (exit code 0)" in resumed.stdout


@pytest.mark.slow
def test_zero3_trains_and_resumes_through_the_cli_at_dp2(tmp_path):
    """DP=2 ZeRO-3 from `loom train` (torchrun): the same losses as ZeRO-1 up to float rounding, and a
    resume from its partitioned checkpoint reproduces the uninterrupted steps bit for bit."""
    common = ["train.max_steps=4", "checkpoint.every=2", *QUIET]
    zero1, zero3 = tmp_path / "zero1", tmp_path / "zero3"
    run_loom(["train", TINY, f"output_dir={zero1}", "parallel.zero_stage=1", *common], nproc=2)
    out = run_loom(["train", TINY, f"output_dir={zero3}", "parallel.zero_stage=3", *common], nproc=2)
    assert "layout: DP 2 × PP 1 × TP 1, ZeRO-3" in out.stdout
    want = read_scalars(zero1 / "tensorboard")["train/loss"]
    got = read_scalars(zero3 / "tensorboard")["train/loss"]
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert math.isclose(got[step], want[step], rel_tol=1e-4), f"step {step}: ZeRO-3 {got[step]} vs {want[step]}"
    resumed = tmp_path / "resumed"
    shutil.copytree(zero3 / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    out = run_loom(
        ["train", TINY, f"output_dir={resumed}", "parallel.zero_stage=3", *common, "--resume", "auto"], nproc=2
    )
    assert "at step 2" in out.stdout
    again = read_scalars(resumed / "tensorboard")["train/loss"]
    assert {s: again[s] for s in (3, 4)} == {s: got[s] for s in (3, 4)}


@pytest.mark.slow
def test_compile_through_the_cli(tmp_path):
    """`train.compile=true`: inductor writes kernels into the (fresh) cache and the losses match eager."""
    common = ["train.max_steps=3", "checkpoint.every=0", *QUIET]
    eager, compiled, cache = tmp_path / "eager", tmp_path / "compiled", tmp_path / "inductor"
    run_loom(["train", TINY, f"output_dir={eager}", *common])
    out = run_loom(
        ["train", TINY, f"output_dir={compiled}", "train.compile=true", *common],
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
    )
    assert "finished at step 3 (exit code 0)" in out.stdout
    kernels = list(cache.rglob("*.py"))
    assert kernels, f"inductor generated no code under {cache}: the blocks were not compiled"
    want = read_scalars(eager / "tensorboard")["train/loss"]
    got = read_scalars(compiled / "tensorboard")["train/loss"]
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert math.isclose(got[step], want[step], rel_tol=1e-4), f"step {step}: compiled {got[step]} vs {want[step]}"
