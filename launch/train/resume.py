"""Where a run starts and how it is saved: resuming from a checkpoint (every rank's exact state), from a
start point (consolidated weights at a new layout), or from `model.init_from`; and the save function
the checkpoint callback calls."""

from __future__ import annotations

import logging
from pathlib import Path

from loom.launch.checkpoint import store
from loom.launch.checkpoint.layout import is_start_point
from loom.launch.checkpoint.locate import resolve_resume
from loom.launch.checkpoint.start_point import load_start_point
from loom.launch.config import RunConfig, to_dict
from loom.launch.train.trainer import TrainState

log = logging.getLogger(__name__)


def restore(cfg: RunConfig, sharded, loader, tokenizer_sha256: str) -> TrainState:
    """Load what `checkpoint.resume` / `model.init_from` name into the engine, the loader and the RNGs;
    returns the trainer state to continue from (step 0 when starting fresh). Collective."""
    resume_from = resolve_resume(cfg.checkpoint.resume, cfg.output_dir)
    trust = cfg.checkpoint.trust_pickles
    if resume_from is not None and is_start_point(resume_from):
        # consolidated weights (and optimizer state) re-sliced for this layout: a layout change
        meta = load_start_point(sharded, resume_from, cfg.model, tokenizer_sha256, optimizer=True)
        state = TrainState(**meta["state"])
        log.info(
            f"resumed from start point {resume_from} at step {state.step} at this layout; the data stream restarts"
        )
        return state
    if resume_from is not None:
        meta, rank_state = store.load(sharded.engine, resume_from, trust_pickles=trust)
        state = TrainState(**meta["state"])
        if rank_state is not None:
            loader.load_state_dict(rank_state["loader"])
            store.set_rng_state(rank_state["rng"])
            if sharded.module.hcma is not None:
                sharded.module.hcma.load_state_dict(rank_state.get("hcma", {}))
        else:
            log.warning("the checkpoint was written by a different number of ranks; the data stream restarts")
        log.info(f"resumed from {resume_from} at step {state.step} ({state.consumed_tokens:,} tokens)")
        return state
    if cfg.model.init_from:
        load_start_point(sharded, cfg.model.init_from, cfg.model, tokenizer_sha256, optimizer=False)
        log.info(f"initialised weights from {cfg.model.init_from}")
    return TrainState()


def saved_layout_entry(layout, parallel) -> dict[str, int]:
    """meta.json's `layout`; `vp` (model chunks per pipeline rank) only when the schedule interleaves,
    so a checkpoint without it is one chunk per rank."""
    entry = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "zero": parallel.zero_stage}
    if parallel.virtual_stages > 1:
        entry["vp"] = parallel.virtual_stages
    return entry


def make_saver(cfg: RunConfig, layout, sharded, loader, tokenizer_path: str | None):
    """The function `CheckpointCallback` calls: engine state, Loom's plain-data per-rank state, meta."""

    def save(trainer) -> Path:
        meta = {
            "state": trainer.state.as_dict(),
            "world_size": layout.world_size,
            "config": to_dict(cfg),
            "layout": saved_layout_entry(layout, cfg.parallel),
        }
        rank_state = {
            "loader": loader.state_dict(),
            "rng": store.rng_state(),
            "hcma": sharded.module.hcma.state_dict() if sharded.module.hcma is not None else {},
        }
        return store.save(
            sharded.engine,
            cfg.output_dir,
            trainer.state.step,
            rank_state,
            meta,
            tokenizer_path,
            cfg.checkpoint.keep_last,
        )

    return save
