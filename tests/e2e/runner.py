"""Run the real `loom` CLI the way users do (torchrun for several processes) and read back what it
wrote (TensorBoard event files, checkpoints)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil

from loom.launch.runtime.env import loom_command

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def loom_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra or {})
    return env


def kill_process_tree(pid: int) -> bool:
    """SIGKILL a launcher and all its descendants. torchrun starts its workers in sessions of their
    own, so killing its process group would leave the ranks running. True if the launcher and at least
    one process below it were still alive."""
    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    alive = []
    for p in victims:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    return len(alive) > 1  # the launcher and at least one rank were still running


def rank_process(launcher_pid: int, rank: int) -> psutil.Process:
    """The `loom` process of global rank `rank` below a launcher (torchrun)."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "loom.launch.cli" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process for rank {rank}")


def run_loom(
    args: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        loom_command(args, nproc), cwd=REPO, env=loom_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"loom {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_scalars(logdir: str | Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
