"""One run per output directory: a second `loom train` on the same directory refuses to start
instead of interleaving checkpoints with the first. The lock is an flock held by global rank 0
for the life of the process, so it disappears with the process, even after kill -9."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import torch.distributed as dist

from loom.model.parallel import comm

_held = []


def acquire_run_lock(run_dir: str) -> None:
    """Collective: rank 0 takes the lock; every rank raises if it could not."""
    problem = [None]
    if dist.get_rank() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path = Path(run_dir) / ".lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held.append(handle)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            problem[0] = f"{run_dir} is in use by another run (pid {owner}); choose another output_dir"
    problem[0] = comm.broadcast_object(problem[0])
    if problem[0]:
        raise ValueError(problem[0])


def discard_if_unused(run_dir: str) -> None:
    """Rank 0, when a run that created `run_dir` ends: if it stopped before writing anything but its
    lock and config.yaml (bad input found during set-up), remove those and the folder, so a mistyped
    command leaves nothing behind. A folder with anything else in it is kept."""
    if not _held:  # not rank 0, or the lock was never taken
        return
    folder = Path(run_dir)
    try:
        if {p.name for p in folder.iterdir()} <= {".lock", "config.yaml"}:
            (folder / "config.yaml").unlink(missing_ok=True)
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # something appeared meanwhile: keep it
        pass
    _held.pop().close()
