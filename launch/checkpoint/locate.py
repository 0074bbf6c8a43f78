"""Finding a checkpoint — the one place every command does it: `loom train --resume`, `loom convert`,
`loom eval` and `loom generate` all accept the same things and verify them the same way.

A path may be a checkpoint step folder (…/checkpoints/step_N), a consolidated folder, a run directory
or its `checkpoints/` folder (then the newest checkpoint whose manifest verifies; damaged or partial
ones are reported and skipped).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loom.launch.checkpoint.errors import CheckpointError, ConvertError
from loom.launch.checkpoint.layout import (
    CHECKPOINTS,
    CONSOLIDATED_INFO,
    DEEPSPEED,
    MANIFEST,
    META,
    checkpoint_root,
)
from loom.launch.checkpoint.manifest import verify

log = logging.getLogger(__name__)


def newest_intact(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run whose manifest verifies, and why each newer one was skipped."""
    root = checkpoint_root(run_dir)
    skipped: list[str] = []
    if not root.is_dir():
        return None, skipped
    for folder in sorted(root.glob("step_*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"skipping checkpoint {folder}: {problem}")
    return None, skipped


def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """`newest_intact`, logging every checkpoint it skips."""
    found, skipped = newest_intact(run_dir)
    for message in skipped:
        log.warning(message)
    return found


def locate_checkpoint(path: str | os.PathLike) -> Path:
    """A verified checkpoint or consolidated folder from any of the accepted paths; raises ConvertError."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if not p.is_dir():
        raise ConvertError(f"{path} is a file; expected a checkpoint folder (…/checkpoints/step_N) or a run directory")
    if any((p / marker).exists() for marker in (CONSOLIDATED_INFO, META, MANIFEST, DEEPSPEED)):
        problem = verify(p)
        if problem is not None:
            raise ConvertError(f"{p} is not a complete checkpoint: {problem}")
        return p
    root = p if p.name == CHECKPOINTS else p / CHECKPOINTS
    if root.is_dir():
        found, skipped = newest_intact(root.parent)
        for message in skipped:
            log.warning(message)
        if found is not None:
            return found
        detail = f" ({skipped[0].removeprefix('skipping checkpoint ')})" if skipped else ""
        raise ConvertError(f"{path} has no complete checkpoint{detail}")
    raise ConvertError(f"{path} is neither a Loom checkpoint (no meta.json / MANIFEST.json) nor a run directory")


def resolve_resume(resume: str, run_dir: str) -> Path | None:
    """`checkpoint.resume` (none, auto or a path) → the folder to resume from. Rank 0 decides and every
    rank gets the same answer (collective over the default group)."""
    import torch.distributed as dist

    from loom.model.parallel.comm import broadcast_object

    choice = None
    if dist.get_rank() == 0:
        if resume == "auto":
            found = find_resumable(run_dir)
            choice = str(found) if found else None
        elif resume != "none":
            try:
                choice = str(locate_checkpoint(resume))
            except ConvertError as exc:
                choice = f"error:{exc}"
    choice = broadcast_object(choice)
    if choice and choice.startswith("error:"):
        raise CheckpointError(f"cannot resume from {resume}: {choice[6:]}")
    return Path(choice) if choice else None
