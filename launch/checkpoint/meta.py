"""The JSON side of a checkpoint or consolidated folder: meta.json, the config the run was trained with,
and the layout that wrote it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import META


def read_meta(folder: str | os.PathLike) -> dict:
    """meta.json of a checkpoint or consolidated folder (step, layout, resolved config)."""
    path = Path(folder) / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{path} is missing or unreadable") from None
    if not isinstance(meta, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return meta


def read_config(folder: str | os.PathLike):
    """The RunConfig a checkpoint or consolidated folder was written with."""
    from loom.launch.config import config_from_saved

    return config_from_saved(read_meta(folder).get("config") or {})


def saved_layout(meta: dict) -> dict[str, int]:
    """tp, pp, dp and zero of the run that wrote a DeepSpeed checkpoint, and vp (model chunks per
    pipeline rank) when that run interleaved its pipeline."""
    layout = meta.get("layout") or {}
    keys = ("tp", "pp", "dp", "zero") + (("vp",) if "vp" in layout else ())
    try:
        out = {key: int(layout[key]) for key in keys}
    except (KeyError, TypeError, ValueError):
        raise ConvertError("meta.json has no valid 'layout': not written by `loom train`") from None
    if out.get("vp", 1) < 1:
        raise ConvertError(f"meta.json's layout has vp {out['vp']}: model chunks per rank must be positive")
    return out


def pipeline_stages(layout: dict | None) -> int:
    """Virtual pipeline stages of a saved layout (pp × vp): the units stage-local CMR and the block order
    of the files follow."""
    layout = layout or {}
    return int(layout.get("pp") or 1) * int(layout.get("vp") or 1)
