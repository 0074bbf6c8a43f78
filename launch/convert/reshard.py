"""`loom convert reshard`: a checkpoint of one layout → a start point for another.

The output is a consolidated folder with the optimizer state (layout-free, so any TP×PP×DP×ZeRO can
start from it, see `launch.checkpoint.start_point`); the target layout is validated here and written
into a generated `config.yaml`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loom.launch.checkpoint.consolidated import output_folder, write_consolidated
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.meta import pipeline_stages
from loom.launch.checkpoint.reader import load
from loom.launch.config import config_from_saved, to_yaml

log = logging.getLogger(__name__)


def reshard(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    tensor: int | None = None,
    pipeline: int | None = None,
    zero: int | None = None,
    virtual_stages: int | None = None,
    data_parallel: int | None = None,
    optimizer: bool = True,
    force: bool = False,
    trust_pickles: bool = False,
) -> Path:
    """`loom convert reshard`: a checkpoint of one layout → a start point for another.

    The output is a consolidated folder with the optimizer state (it is layout-free, so any
    TP×PP×DP×ZeRO can start from it); the target layout only validates divisibility and goes into
    the generated `config.yaml`. Resume with `loom train OUT/config.yaml --resume OUT`."""
    data = load(ckpt, optimizer=optimizer, trust_pickles=trust_pickles)
    run_cfg = config_from_saved(data.run_config)
    p = run_cfg.parallel
    if tensor is not None:
        p.tensor = tensor
    if pipeline is not None:
        p.pipeline = pipeline
    if zero is not None:
        p.zero_stage = zero
    if p.tensor == 1 and p.sequence_parallel:
        p.sequence_parallel = False  # it splits the sequence over TP ranks: at TP=1 there is nothing to split
        log.info("parallel.sequence_parallel turned off: the target layout has tensor 1")
    if virtual_stages is not None:
        p.virtual_stages = virtual_stages
    elif pipeline is not None and p.virtual_stages > 1 and (pipeline == 1 or p.microbatches % pipeline):
        log.info(f"note: parallel.virtual_stages {p.virtual_stages} does not fit PP {pipeline}: one chunk per rank")
        p.virtual_stages = 1
    world = None if data_parallel is None else data_parallel * p.tensor * p.pipeline
    problems = p.validate(world) + run_cfg.model.validate(p.tensor, p.pipeline, p.virtual_stages)
    if run_cfg.model.tie_embeddings and p.pipeline > 1 and p.zero_stage == 2:
        problems.append("model.tie_embeddings with parallel.pipeline > 1 needs zero_stage 0 or 1")
    if problems:
        raise ConvertError("the target layout is not valid for this model: " + "; ".join(problems))
    for note in data.notes:
        log.info(f"note: {note}")
    # stage-local CMR follows the virtual stages (pipeline × chunks per rank), not the ranks
    src_stages = pipeline_stages(data.source.get("layout")) if data.source.get("layout") else p.pipeline
    stages = p.pipeline * p.virtual_stages
    if run_cfg.techniques.cmr.enabled and run_cfg.techniques.cmr.stage_local and src_stages != stages:
        log.warning(
            f"CMR is stage-local: with {stages} pipeline stages instead of {src_stages} its targets read other "
            f"sources, so the network changes"
        )
    if optimizer and data.optimizer is None:
        log.info("note: no optimizer state could be read; training from the resharded folder restarts Adam's moments")
    with output_folder(out, force) as tmp:
        target = {"tensor": p.tensor, "pipeline": p.pipeline, "zero_stage": p.zero_stage}
        if p.virtual_stages > 1:
            target["virtual_stages"] = p.virtual_stages
        write_consolidated(data, tmp, kind="reshard", extra={"target_layout": target})
        if data.tokenizer is not None:
            run_cfg.data.tokenizer = str(Path(out).resolve() / "tokenizer.model")
        run_cfg.checkpoint.resume = "none"
        (tmp / "config.yaml").write_text(to_yaml(run_cfg))
    src = data.source.get("layout") or {}
    log.info(
        f"resharded {data.source.get('checkpoint', ckpt)} (TP {src.get('tp')} × PP {src.get('pp')} × "
        f"DP {src.get('dp')}, ZeRO-{src.get('zero')}) → {out} for TP {p.tensor} × PP {p.pipeline}, "
        f"ZeRO-{p.zero_stage}"
        + (" with optimizer state" if data.optimizer is not None else "")
        + f"\n  continue with: loom train {Path(out) / 'config.yaml'} --resume {out}  (any DP size; the data "
        f"stream restarts)"
    )
    return Path(out)
