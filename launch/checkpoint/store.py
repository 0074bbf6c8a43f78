"""Checkpoints: DeepSpeed engine state plus Loom's own, written atomically and verified on load.

Layout of `<run>/checkpoints/step_00000120/`:
    ds/                     engine.save_checkpoint (model, optimizer, ZeRO shards)
    loom/rank_00003.pt      per-rank state: data-loader position and RNG states
    meta.json               step, consumed tokens, layout, resolved config
    tokenizer.model         the tokenizer the run trains with
    MANIFEST.json           size and sha256 of every file above; written last

Everything is written into `.tmp-step_…` and renamed when complete, then `latest` is replaced, so a
crash mid-write leaves at most a temporary folder that is never loaded. On resume the newest
checkpoint whose manifest verifies is used; a corrupted one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from loom.launch.runtime.faults import maybe_kill

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files, "written": time.time()}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path, hashes: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "MANIFEST.json is unreadable"
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != info["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {info['bytes']}"
        if hashes and _sha256(path) != info["sha256"]:
            return f"{rel} fails its sha256 check"
    return None


def find_resumable(run_dir: str | os.PathLike, log=print) -> Path | None:
    """The newest checkpoint that verifies; corrupted or partial ones are reported and skipped."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    for folder in sorted(root.glob("step_*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        log(f"warning: skipping checkpoint {folder}: {problem}")
    return None


def resolve_resume(resume: str, run_dir: str, log=print) -> Path | None:
    """Rank 0 decides, everyone gets the same answer."""
    choice = [None]
    if dist.get_rank() == 0:
        if resume == "none":
            choice[0] = None
        elif resume == "auto":
            found = find_resumable(run_dir, log)
            choice[0] = str(found) if found else None
        else:
            folder = Path(resume)
            problem = verify(folder) if folder.is_dir() else f"{resume} is not a checkpoint directory"
            choice[0] = f"error:{problem}" if problem else str(folder)
    dist.broadcast_object_list(choice, src=0)
    if choice[0] and choice[0].startswith("error:"):
        raise CheckpointError(f"cannot resume from {resume}: {choice[0][6:]}")
    return Path(choice[0]) if choice[0] else None


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(module: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.numel()]
    ok = torch.stack(flags).all().float() if flags else torch.ones(())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


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
            (tmp / "loom").mkdir(parents=True)
    except OSError as exc:
        error = exc
    _agree(error, "preparing", tmp)
    try:
        engine.save_checkpoint(
            str(tmp / "ds"), tag="state", client_state={"universal_checkpoint_info": {}}, save_latest=False
        )
        torch.save(rank_state, tmp / "loom" / f"rank_{rank:05d}.pt")
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as either
        error = exc
    maybe_kill(step, "save")
    _agree(error, "writing", tmp)
    try:
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if tokenizer_path and os.path.isfile(tokenizer_path):
                shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            latest_tmp = root / "latest.tmp"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, root / "latest")
            _apply_retention(root, keep_last)
    except OSError as exc:
        error = exc
    _agree(error, "publishing", tmp)
    return final


def _agree(error: Exception | None, phase: str, tmp: Path) -> None:
    """All ranks learn whether any rank failed; on failure the partial folder is removed and the
    previous checkpoints are left untouched."""
    failed = torch.tensor([0.0 if error is None else 1.0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() == 0:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
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


def load(engine, folder: Path) -> tuple[dict, dict | None]:
    """Load engine state; returns (meta, this rank's Loom state or None if the layout changed)."""
    meta = json.loads((folder / "meta.json").read_text())
    load_path, _ = engine.load_checkpoint(str(folder / "ds"), tag="state")
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {folder / 'ds'}")
    rank_file = folder / "loom" / f"rank_{dist.get_rank():05d}.pt"
    same_world = meta.get("world_size") == dist.get_world_size()
    rank_state = torch.load(rank_file, weights_only=False) if (same_world and rank_file.is_file()) else None
    return meta, rank_state
