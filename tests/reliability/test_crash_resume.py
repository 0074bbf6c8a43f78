"""Crash anywhere, lose nothing: kill -9 one rank (at a step, or in the middle of a checkpoint
write) or the whole job at seeded random points; `--resume auto` must continue to exactly the
uninterrupted run's loss trajectory. One run per layout is killed five times in a row (each
restart resumes, then dies again later), which costs six launches instead of ten."""

import os
import random
import signal
import subprocess

import pytest

from tests.e2e.runner import REPO, TINY, loom_command, read_scalars, run_loom, test_env

STEPS = 7
COMMON = [
    f"train.max_steps={STEPS}",
    "checkpoint.every=1",
    "checkpoint.keep_last=2",
    "train.log_every=1",
    "train.eval_every=0",
    "data.num_workers=0",
]
LAYOUTS = {"dp2": [], "pp2": ["parallel.pipeline=2"], "tp2": ["parallel.tensor=2"]}


def _kill_points(layout: str) -> list[tuple]:
    """Five per layout at steps 2..6 in order: three single-rank kills (at least one mid-save) and
    two whole-job kills, shuffled with a seed per layout."""
    rng = random.Random(f"loom-{layout}")
    kinds = [("rank", "save"), ("rank", "step"), ("rank", rng.choice(["step", "save"])), ("job", None), ("job", None)]
    rng.shuffle(kinds)
    return [
        (kind, rng.randrange(2) if kind == "rank" else None, step, phase)
        for (kind, phase), step in zip(kinds, range(2, STEPS))
    ]


def _kill_whole_job_after(args: list[str], step: int) -> None:
    proc = subprocess.Popen(
        loom_command(args, nproc=2),
        cwd=REPO,
        env=test_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith(f"step {step}/"):
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = {}
    for name, extra in LAYOUTS.items():
        run = tmp_path_factory.mktemp(f"ref-{name}")
        run_loom(["train", TINY, f"output_dir={run}", *COMMON, *extra], nproc=2)
        out[name] = read_scalars(run / "tensorboard")["train/loss"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_kill_points_resume_to_the_same_trajectory(uninterrupted, tmp_path, layout):
    want = uninterrupted[layout]
    assert sorted(want) == list(range(1, STEPS + 1))
    run = tmp_path / "run"
    args = ["train", TINY, f"output_dir={run}", *COMMON, *LAYOUTS[layout], "--resume", "auto"]
    history = []
    for kind, rank, step, phase in _kill_points(layout):
        history.append(f"{kind} kill at step {step} ({phase or 'any time'}, rank {rank})")
        if kind == "rank":
            crashed = run_loom(args, nproc=2, env={"LOOM_FAULT_KILL": f"{rank}:{step}:{phase}"}, check=False)
            assert crashed.returncode != 0, f"{history[-1]}: the job did not fail"
        else:
            _kill_whole_job_after(args, step)
    resumed = run_loom(args, nproc=2)
    assert "resumed from" in resumed.stdout
    got = read_scalars(run / "tensorboard")["train/loss"]
    assert sorted(got) == sorted(want), history
    assert got == want, f"{layout} after {history}: trajectory differs: {got} vs {want}"
