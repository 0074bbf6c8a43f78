"""`loom` with two test-only faults around checkpoint saves, at exact steps (no timing races):

LOOM_TEST_FILL_DISK_AT=4,8     before every save of these steps, a filler file takes all free space of the
                               checkpoint folder's file system (the save then runs into a real ENOSPC);
                               the filler is removed after the save, so later saves have room again
LOOM_TEST_NAN_WEIGHTS_AT=4     before the save of this step, the model's first weight (the embedding table)
                               becomes NaN: every later loss is NaN, the optimizer skips those steps, so the
                               weights stay NaN

Usage: python tests/reliability/fault_runner.py train CONFIG [overrides] (one process; the checkpoint folder
must be a small tmpfs). The product's own fault injection (launch/runtime/faults.py) has neither fault.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

FILL_DISK = "LOOM_TEST_FILL_DISK_AT"
NAN_WEIGHTS = "LOOM_TEST_NAN_WEIGHTS_AT"


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def fill_file_system(folder: Path) -> Path:
    """Write zeros into `folder/.filler` until the file system is full."""
    filler = folder / ".filler"
    block = bytes(1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    while True:  # the last partial megabyte
        try:
            with open(filler, "ab", buffering=0) as f:
                f.write(bytes(4096))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return filler


def main() -> int:
    import torch

    from loom.launch.checkpoint import store
    from loom.launch.cli import main as loom_main

    fill_at, nan_at, real_save = _steps(FILL_DISK), _steps(NAN_WEIGHTS), store.save

    def save(engine, run_dir, step, *args, **kwargs):
        if step in nan_at:
            with torch.no_grad():
                next(p for p in engine.module.parameters() if p.numel()).fill_(float("nan"))
        filler = fill_file_system(store.checkpoint_root(run_dir)) if step in fill_at else None
        try:
            return real_save(engine, run_dir, step, *args, **kwargs)
        finally:
            if filler is not None:
                filler.unlink()

    store.save = save  # run.py calls it as `checkpoint.save`, looked up at call time
    return loom_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
