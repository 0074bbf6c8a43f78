"""`loom convert consolidate`: a checkpoint of any layout → a consolidated folder (full fp32 weights
as safetensors + JSON, optionally Adam's state), the layout-free form every other conversion reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loom.launch.checkpoint.consolidated import output_folder, write_consolidated
from loom.launch.checkpoint.reader import load
from loom.model.state_dict_adapter import is_training_only

log = logging.getLogger(__name__)


def consolidate(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    optimizer: bool = False,
    force: bool = False,
    trust_pickles: bool = False,
) -> Path:
    data = load(ckpt, optimizer=optimizer, trust_pickles=trust_pickles)
    for note in data.notes:
        log.info(f"note: {note}")
    with output_folder(out, force) as tmp:
        write_consolidated(data, tmp, kind="consolidate")
    n = sum(t.numel() for name, t in data.weights.items() if not is_training_only(name))
    layout = data.source.get("layout") or {}
    where = (
        f" [TP {layout.get('tp')} × PP {layout.get('pp')} × DP {layout.get('dp')}, ZeRO-{layout.get('zero')}]"
        if layout
        else ""
    )
    log.info(
        f"consolidated {len(data.weights)} tensors ({n:,} model parameters, fp32) from "
        f"{data.source.get('checkpoint', ckpt)}{where}"
        + (" with optimizer state" if data.optimizer is not None else "")
        + f" → {out}"
    )
    return Path(out)
