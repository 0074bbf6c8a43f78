"""A hung peer, a full disk, two runs on one directory, a corrupted newest checkpoint."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from loom.launch.checkpoint.store import find_resumable, verify
from tests.e2e.runner import REPO, TINY, loom_command, read_scalars, run_loom, test_env

QUIET = ["train.log_every=1", "train.eval_every=0", "data.num_workers=0"]


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if "loom.launch.cli" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process for rank {rank}")


@pytest.mark.slow
def test_hung_peer_fails_within_the_timeout_and_is_named(tmp_path):
    args = [
        "train",
        TINY,
        f"output_dir={tmp_path / 'run'}",
        "train.max_steps=100000",
        "checkpoint.every=0",
        "parallel.timeout_s=15",
        *QUIET,
    ]
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
            if line.startswith("step 3/"):
                break
        hung = _rank_process(psutil.Process(proc.pid), 1)
        hung.suspend()  # SIGSTOP: alive but silent, like a stuck GPU or a partitioned node
        stopped_at = time.monotonic()
        output, _ = proc.communicate(timeout=240)
        elapsed = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "lost contact with rank 1" in output, output[-3000:]
    assert elapsed < 15 + 90, f"the survivor took {elapsed:.0f} s to give up"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize("policy,code", [("continue", 0), ("stop", 4)])
def test_full_disk_during_save_keeps_the_last_good_checkpoint(tmp_path, policy, code):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    if os.geteuid() != 0 or not _mount_tmpfs(ckpts, "10m"):  # one tiny checkpoint is ~7.2 MB
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = run_loom(
            [
                "train",
                TINY,
                f"output_dir={run}",
                "train.max_steps=4",
                "checkpoint.every=2",
                f"checkpoint.on_save_error={policy}",
                *QUIET,
            ],
            check=False,
        )
        assert out.returncode == code, out.stdout[-2000:] + out.stderr[-2000:]
        assert "checkpoint save failed" in out.stdout
        good = find_resumable(run)
        assert good is not None and good.name == "step_00000002" and verify(good) is None
        assert not list(ckpts.glob(".tmp-*")), "the failed partial write must be cleaned up"
        steps = sorted(read_scalars(run / "tensorboard")["train/loss"])
        assert steps == ([1, 2, 3, 4] if policy == "continue" else [1, 2, 3, 4])
    finally:
        subprocess.run(["umount", str(ckpts)], capture_output=True)


@pytest.mark.slow
def test_second_run_on_the_same_directory_refuses(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        loom_command(["train", TINY, f"output_dir={run}", "train.max_steps=100000", "checkpoint.every=0", *QUIET]),
        cwd=REPO,
        env=test_env(),
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
