"""HCMA offline mode on a checkpoint (docs/techniques.md, HCMA): refresh the hierarchy on the full input
embedding table, run the T aligning steps with centroids, weights and anchor fixed, re-apply the
row norms, and write a start point with the aligned table (a tied output layer is the same table;
an untied one is left alone, `apply_to_output_embedding: tied`). The Adam state is carried over
unchanged, as the spec says; training or export continues from the result at any layout."""

from __future__ import annotations

import dataclasses
import logging

from loom.launch.checkpoint.consolidated import output_folder, write_consolidated
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.reader import load

log = logging.getLogger(__name__)


def align_embeddings(ckpt: str, out: str, force: bool = False, trust_pickles: bool = False) -> dict:
    from loom.techniques.hcma import HCMA

    data = load(ckpt, optimizer=True, trust_pickles=trust_pickles)
    cfg_model, tech = data.model, data.techniques
    table = data.weights.get("embedding.weight")
    if table is None:
        raise ConvertError(f"{ckpt}: no embedding.weight to align")
    hcma = HCMA(tech.hcma, cfg_model.hidden_size)
    hcma.refresh(table, 0, table.shape[0])
    aligned = hcma.offline_align(table)
    moved = float((aligned - table).norm() / table.norm())
    weights = dict(data.weights, **{"embedding.weight": aligned})
    with output_folder(out, force) as folder:
        write_consolidated(
            dataclasses.replace(data, weights=weights),
            folder,
            kind="align-embeddings",
            extra={"hcma": {"relative_change": moved, **{k: float(v) for k, v in hcma.metrics().items()}}},
        )
    log.info(f"aligned {table.shape[0]} embedding rows (relative change {moved:.4f}) → {out}")
    return {"relative_change": moved}
