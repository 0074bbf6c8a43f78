"""Reading a checkpoint: the one reader every command uses for what a checkpoint folder holds.

`load` turns any accepted path (see `locate`) into full, layout-free weights (`Consolidated`): a
consolidated folder is read from safetensors and JSON only; a DeepSpeed checkpoint of any
TP×PP×DP×ZeRO layout is merged by `read_deepspeed`, whose every pickle passes the allowlist check of
`unpickle` first. `meta` reads the JSON side (meta.json, the saved config, the saved layout).
"""

from __future__ import annotations

import os

from loom.launch.checkpoint.consolidated import Consolidated, read_consolidated
from loom.launch.checkpoint.layout import is_consolidated
from loom.launch.checkpoint.locate import locate_checkpoint


def load(path: str | os.PathLike, optimizer: bool = False, trust_pickles: bool = False) -> Consolidated:
    """Full weights (and optionally Adam's state) from a checkpoint, run directory or consolidated folder."""
    folder = locate_checkpoint(path)
    if is_consolidated(folder):
        return read_consolidated(folder, optimizer=optimizer)
    from loom.launch.checkpoint.read_deepspeed import read_checkpoint

    return read_checkpoint(folder, optimizer=optimizer, trust_pickles=trust_pickles)
