"""Real checkpoints of every ZeRO stage and of a pipeline layout, written once per session by `loom train`,
and a way to plant a malicious pickle in a copy of one."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from loom.launch.checkpoint.manifest import write_manifest
from tests.e2e.runner import TINY, run_loom

SHORT = ["train.max_steps=2", "checkpoint.every=2", "train.eval_every=0", "train.log_every=1", "data.num_workers=0"]
LAYOUTS = {  # name → (processes, overrides)
    "zero0": (1, ["parallel.zero_stage=0"]),
    "zero1_dp2": (2, ["parallel.zero_stage=1"]),
    "zero2_dp2": (2, ["parallel.zero_stage=2"]),
    "zero3_dp2": (2, ["parallel.zero_stage=3"]),
    "pp2_zero1": (2, ["parallel.pipeline=2", "parallel.zero_stage=1"]),
    "bf16_zero1_dp2": (2, ["parallel.zero_stage=1", "train.precision=bf16"]),
}


@pytest.fixture(scope="session")
def layout_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name → run directory with a complete checkpoint at step 2."""
    out = {}
    for name, (nproc, extra) in LAYOUTS.items():
        run = tmp_path_factory.mktemp(name)
        run_loom(["train", TINY, f"output_dir={run}", *SHORT, *extra], nproc=nproc)
        out[name] = run
    return out


class Planted:
    """Unpickling this creates `path`: the stand-in for any code a malicious checkpoint could run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(file: Path, marker: Path) -> None:
    """Rewrite one pickle of a checkpoint with a payload inside, as an attacker who also rewrites the
    manifest would (so the sha256 check passes)."""
    is_rank_state = file.parent.name == "loom"
    state = dict(torch.load(file, map_location="cpu", weights_only=False))  # our own fixture's file, read in full
    state["payload"] = Planted(marker)
    torch.save(state, file, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    folder = file.parents[1] if is_rank_state else file.parents[2]
    write_manifest(folder)


def tampered_copy(run: Path, tmp_path: Path, which: str) -> tuple[Path, Path, Path]:
    """A copy of a run directory whose newest checkpoint carries a payload in `which` (rank state, model
    states or optimizer states); returns (the copy's step folder, the tampered file, the marker file the
    payload would create)."""
    copy = tmp_path / "tampered"
    shutil.copytree(run, copy)
    step = copy / "checkpoints" / "step_00000002"
    ds = step / "ds" / "state"
    target = {
        "rank": step / "loom" / "rank_00000.pt",
        "model": sorted(ds.glob("*model_states.pt"))[0],
        "optim": sorted(ds.glob("*optim_states.pt"))[0],
    }[which]
    marker = tmp_path / f"pwned-{which}"
    plant(target, marker)
    assert not marker.exists()
    return step, target, marker
