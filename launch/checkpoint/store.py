"""Saving a run's checkpoint and loading it back to resume: DeepSpeed's engine state plus Loom's own,
written atomically (see `layout` for what a checkpoint folder holds).

Everything is written into `.tmp-step_…` and renamed when complete, then `latest` is replaced, so a
crash mid-write leaves at most a temporary folder that is never loaded. On resume the newest
checkpoint whose manifest verifies is used (`locate`); a corrupted one is reported and skipped.
Loom's per-rank state is plain data (tensors, numbers, strings, lists, dicts) and is read with
torch's weights-only unpickler.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from loom.launch.checkpoint.errors import CheckpointError
from loom.launch.checkpoint.layout import (
    LATEST,
    MANIFEST,
    META,
    RANK_STATE_DIR,
    TOKENIZER,
    checkpoint_root,
    deepspeed_dir,
    rank_state_file,
    step_dirname,
)
from loom.launch.checkpoint.manifest import write_manifest
from loom.launch.runtime.faults import maybe_kill
from loom.model.parallel import comm


def rng_state() -> dict:
    """Every random generator's state as plain data (tensors, ints, floats, strings, lists)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": list(python_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(module: torch.nn.Module) -> bool:
    """Every rank's parameters are finite (collective over the default group)."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.numel()]
    ok = torch.stack(flags).all().float() if flags else torch.ones(())
    return comm.all_reduce_values([float(ok)], op=comm.ReduceOp.MIN)[0] == 1.0


def save(
    engine, run_dir: str, step: int, rank_state: dict, meta: dict, tokenizer_path: str | None, keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint folder."""
    if not all_finite(engine.module):
        raise CheckpointError(f"refusing to save step {step}: the weights contain NaN or inf")
    root = checkpoint_root(run_dir)
    final = root / step_dirname(step)
    tmp = root / (".tmp-" + step_dirname(step))
    rank = dist.get_rank()
    error = None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RANK_STATE_DIR).mkdir(parents=True)
    except OSError as exc:
        error = exc
    _agree(error, "preparing", tmp)
    try:
        ds = deepspeed_dir(tmp)
        engine.save_checkpoint(
            str(ds.parent), tag=ds.name, client_state={"universal_checkpoint_info": {}}, save_latest=False
        )
        torch.save(rank_state, rank_state_file(tmp, rank))
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as either
        error = exc
    maybe_kill(step, "save")
    _agree(error, "writing", tmp)
    try:
        if rank == 0:
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
            if tokenizer_path and os.path.isfile(tokenizer_path):
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = root / (LATEST + ".tmp")
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, root / LATEST)
            _apply_retention(root, keep_last)
    except OSError as exc:
        error = exc
    _agree(error, "publishing", tmp)
    return final


def _agree(error: Exception | None, phase: str, tmp: Path) -> None:
    """All ranks learn whether any rank failed; on failure the partial folder is removed and the
    previous checkpoints are left untouched."""
    failed = comm.all_reduce_values([0.0 if error is None else 1.0], op=comm.ReduceOp.MAX)[0]
    if failed == 0:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    comm.barrier()
    detail = f": {error}" if error is not None else " on another rank"
    raise CheckpointError(
        f"checkpoint save failed while {phase} {tmp.name}{detail}; the previous checkpoints are intact"
    )


def _apply_retention(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / MANIFEST).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def load(engine, folder: Path, trust_pickles: bool = False) -> tuple[dict, dict | None]:
    """Load a checkpoint into a live engine (every rank); returns (meta, this rank's Loom state, or None
    when the checkpoint was written by a different number of ranks). Every pickle this rank reads is
    checked against the allowlist (`unpickle`) before DeepSpeed's loader sees any file, unless the user
    trusts the checkpoint; all ranks agree before anything is loaded, so a refusal stops every rank
    with the same error instead of leaving the others waiting."""
    from loom.launch.checkpoint.meta import read_meta
    from loom.launch.checkpoint.unpickle import UnsafeCheckpointError, check_deepspeed_files, load_plain

    meta = read_meta(folder)
    _require_same_model_parallel_layout(meta, folder, getattr(engine.module, "virtual_stages", 1))
    ds = deepspeed_dir(folder)
    rank_file = rank_state_file(folder, dist.get_rank())
    same_world = meta.get("world_size") == dist.get_world_size()
    rank_state, error = None, None
    try:
        if not trust_pickles:
            check_deepspeed_files(ds)
        if same_world and rank_file.is_file():
            rank_state = load_plain(rank_file, trust_pickles)
    except ValueError as exc:  # UnsafeCheckpointError, or a damaged file
        error = exc
    if comm.all_reduce_values([0.0 if error is None else 1.0], op=comm.ReduceOp.MAX)[0]:
        raise error or UnsafeCheckpointError(f"another rank refused a file of {folder}; see its error")
    load_path, _ = engine.load_checkpoint(str(ds.parent), tag=ds.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ds}")
    return meta, rank_state


def _require_same_model_parallel_layout(meta: dict, folder: Path, virtual_stages: int) -> None:
    """A checkpoint holds one file per TP×PP rank with that rank's blocks; another TP or PP size or another
    number of model chunks needs a start point first (the same error on every rank, before DeepSpeed's
    loader fails on missing keys)."""
    from loom.model.parallel.groups import current_layout

    saved, live = meta.get("layout") or {}, current_layout()
    was = (saved.get("tp", live.tp), saved.get("pp", live.pp), saved.get("vp", 1))
    if was != (live.tp, live.pp, virtual_stages):
        raise CheckpointError(
            f"{folder} was saved at tensor {was[0]} × pipeline {was[1]} × {was[2]} chunk(s) per rank, this run is "
            f"tensor {live.tp} × pipeline {live.pp} × {virtual_stages}: re-slice it first with `loom convert "
            f"reshard {folder} OUT --tensor {live.tp} --pipeline {live.pp} --virtual-stages {virtual_stages}` "
            "and resume from OUT"
        )
