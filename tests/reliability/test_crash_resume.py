"""Crash anywhere, lose nothing: kill -9 one rank (at a step, or in the middle of a checkpoint
write) or the whole job at seeded random points; `--resume auto` must continue to exactly the
uninterrupted run's loss trajectory. One run per layout is killed five times in a row (each
restart resumes, then dies again later), which costs six launches instead of ten."""

import random
import subprocess

import pytest

from tests.e2e.runner import REPO, TINY, kill_process_tree, loom_command, loom_env, read_scalars, run_loom

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


def _kill_whole_job_after(args: list[str], step: int) -> bool:
    """Start the job, SIGKILL every one of its processes once step `step` is logged; False if the job
    ended without logging that step (it resumed past it), so there was nothing to kill."""
    proc = subprocess.Popen(
        loom_command(args, nproc=2),
        cwd=REPO,
        env=loom_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    killed = False
    try:
        for line in proc.stdout:
            if line.startswith(f"step {step}/"):
                killed = kill_process_tree(proc.pid)
                break
    finally:
        kill_process_tree(proc.pid)  # a no-op after a kill or a normal exit
        proc.wait(timeout=60)
        proc.stdout.close()
    return killed


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
    points = _kill_points(layout)
    history, kills = [], 0
    for kind, rank, step, phase in points:
        if kind == "rank":
            crashed = run_loom(args, nproc=2, env={"LOOM_FAULT_KILL": f"{rank}:{step}:{phase}"}, check=False)
            # torchrun's failure summary names a rank that died of SIGKILL
            happened = crashed.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in crashed.stderr
        else:
            happened = _kill_whole_job_after(args, step)
        kills += happened
        outcome = "done" if happened else "MISSED"
        history.append(f"{kind} kill at step {step} ({phase or 'any time'}, rank {rank}): {outcome}")
    assert kills == len(points) == 5, f"{kills} of {len(points)} kills happened: {history}"
    resumed = run_loom(args, nproc=2)
    assert "resumed from" in resumed.stdout
    got = read_scalars(run / "tensorboard")["train/loss"]
    assert sorted(got) == sorted(want), history
    assert got == want, f"{layout} after {history}: trajectory differs: {got} vs {want}"
