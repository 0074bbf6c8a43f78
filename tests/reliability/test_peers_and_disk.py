"""A hung peer, a full disk, NaN weights at a save, two runs on one directory, a corrupted newest checkpoint."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loom.launch.checkpoint.locate import find_resumable
from loom.launch.checkpoint.manifest import verify
from tests.e2e.runner import REPO, TINY, kill_process_tree, loom_command, loom_env, rank_process, read_scalars, run_loom
from tests.reliability.fault_runner import FILL_DISK, NAN_WEIGHTS

FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")

QUIET = ["train.log_every=1", "train.eval_every=0", "data.num_workers=0"]


# The README's claim: the survivor names the silent rank within parallel.timeout_s plus this margin (the
# collective it waits in starts up to a step after the stop; naming the rank is immediate once its heartbeat
# is stale). torchrun's own shutdown of the stopped rank afterwards is not part of the claim.
HUNG_TIMEOUT_S = 15
HUNG_MARGIN_S = 10


@pytest.mark.slow
def test_hung_peer_fails_within_the_timeout_and_is_named(tmp_path):
    args = [
        "train",
        TINY,
        f"output_dir={tmp_path / 'run'}",
        "train.max_steps=100000",
        "checkpoint.every=0",
        f"parallel.timeout_s={HUNG_TIMEOUT_S}",
        *QUIET,
    ]
    proc = subprocess.Popen(
        loom_command(args, nproc=2),
        cwd=REPO,
        env=loom_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output, named_after = [], None
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("step 3/"):
                break
        hung = rank_process(proc.pid, 1)
        hung.suspend()  # SIGSTOP: alive but silent, like a stuck GPU or a partitioned node
        stopped_at = time.monotonic()
        for line in proc.stdout:
            output.append(line)
            if "lost contact with rank 1" in line and named_after is None:
                named_after = time.monotonic() - stopped_at
                hung.kill()  # spares torchrun's long shutdown of a stopped process; the claim is the survivor's
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            kill_process_tree(proc.pid)
    text = "".join(output)
    assert proc.returncode != 0
    assert named_after is not None, f"the survivor never named rank 1:\n{text[-3000:]}"
    assert named_after <= HUNG_TIMEOUT_S + HUNG_MARGIN_S, (
        f"the survivor named the hung rank {named_after:.1f} s after it stopped "
        f"(timeout {HUNG_TIMEOUT_S} s + margin {HUNG_MARGIN_S} s)"
    )


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    """The run directory with its checkpoints folder on a 32 MB tmpfs (four tiny checkpoints fit)."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    if os.geteuid() != 0 or not _mount_tmpfs(ckpts, "32m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield run
    finally:
        subprocess.run(["umount", str(ckpts)], capture_output=True)


def _fault_run(run: Path, max_steps: int, extra: list[str], fault_env: dict) -> subprocess.CompletedProcess:
    """One process of `loom train` under tests/reliability/fault_runner.py (faults at exact save steps)."""
    args = ["train", TINY, f"output_dir={run}", f"train.max_steps={max_steps}", "checkpoint.every=2", *extra, *QUIET]
    return subprocess.run(
        [sys.executable, str(FAULT_RUNNER), *args],
        cwd=REPO,
        env=loom_env(fault_env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _saved_steps(stdout: str) -> list[int]:
    return [int(m) for m in re.findall(r"checkpoint saved: \S*step_(\d+)", stdout)]


# (policy, step whose saves hit a full disk, exit code, steps trained, checkpoints saved)
FULL_DISK_CASES = [
    ("continue", 4, 0, 8, [2, 6, 8]),  # mid-run: trains on, saves again once there is room
    ("stop", 4, 4, 4, [2]),  # mid-run: exits 4 at once
    ("continue", 8, 4, 8, [2, 4, 6]),  # the final checkpoint is missing: not a success
    ("stop", 8, 4, 8, [2, 4, 6]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy,full_at,code,trained,saved", FULL_DISK_CASES, ids=[f"{c[0]}-full-at-{c[1]}" for c in FULL_DISK_CASES]
)
def test_full_disk_during_save_keeps_the_last_good_checkpoint(small_disk, policy, full_at, code, trained, saved):
    run = small_disk
    out = _fault_run(run, 8, [f"checkpoint.on_save_error={policy}"], {FILL_DISK: str(full_at)})
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == code, log
    assert re.search(rf"error: checkpoint save failed while \w+ \.tmp-step_{full_at:08d}", out.stderr), log
    assert _saved_steps(out.stdout) == saved, log
    assert f"finished at step {trained} (exit code {code})" in out.stdout, log
    assert sorted(read_scalars(run / "tensorboard")["train/loss"]) == list(range(1, trained + 1))
    good = find_resumable(run)
    assert good is not None and good.name == f"step_{saved[-1]:08d}" and verify(good) is None
    assert not (run / "checkpoints" / f"step_{full_at:08d}").exists()
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"the failed partial write must be cleaned up: {leftovers}"


@pytest.mark.slow
def test_weights_with_nan_are_never_saved(tmp_path):
    """A weight turns NaN before the step-4 save: that save and every later one are refused, the
    checkpoint of step 2 stays the newest, and the run, whose final checkpoint is missing, exits 4."""
    run = tmp_path / "run"
    out = _fault_run(run, 6, [], {NAN_WEIGHTS: "4"})
    log = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 4, log
    assert out.stderr.count("error: refusing to save step 4: the weights contain NaN") == 1, log
    assert out.stderr.count("error: refusing to save step 6: the weights contain NaN") == 2, log  # periodic, final
    assert _saved_steps(out.stdout) == [2], log
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    good = find_resumable(run)
    assert good is not None and good.name == "step_00000002"
    for shard in good.rglob("*model_states.pt"):
        state = torch.load(shard, map_location="cpu", weights_only=False)["module"]
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t)), shard


@pytest.mark.slow
def test_second_run_on_the_same_directory_refuses(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        loom_command(["train", TINY, f"output_dir={run}", "train.max_steps=100000", "checkpoint.every=0", *QUIET]),
        cwd=REPO,
        env=loom_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = run_loom(["train", TINY, f"output_dir={run}", "train.max_steps=2", *QUIET], check=False)
        assert second.returncode == 2 and "is in use by another run" in second.stderr
        assert not (run / "checkpoints").exists()
    finally:
        first.kill()
        first.wait(timeout=60)


@pytest.mark.slow
def test_resume_skips_a_corrupted_newest_checkpoint_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run_loom(["train", TINY, f"output_dir={run}", "train.max_steps=4", "checkpoint.every=2", *QUIET])
    newest = run / "checkpoints" / "step_00000004"
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    out = run_loom(["train", TINY, f"output_dir={run}", "train.max_steps=5", *QUIET, "--resume", "auto"])
    assert "warning: skipping checkpoint" in out.stdout and "step_00000004" in out.stdout
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
