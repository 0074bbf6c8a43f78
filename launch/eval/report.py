"""Where `loom eval` puts its results: a JSON file, TensorBoard scalars under `evaluate/`, and a
console summary."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a reader (e.g. `loom study` skipping evaluated runs) never sees a half-written file
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def write_tensorboard(metrics: dict[str, float], tb_dir: str, step: int) -> None:
    from loom.launch.train.tensorboard import MetricsWriter

    writer = MetricsWriter(tb_dir, enabled=True)
    writer.scalars({f"evaluate/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(float(v))}, step)
    writer.close()


def print_summary(result: dict) -> None:
    m = result["metrics"]
    print(f"eval: {len(m)} scalars in {result['wall_s']} s → {result['out']} (TensorBoard: {result['tb']})")
    overrides = " ".join(f"{k}={v}" for k, v in (result.get("overrides") or {}).items())
    print(f"  profile: {result['profile']}" + (f" with --set {overrides}" if overrides else ""))
    if result.get("knn_reference"):
        print(f"  kNN overlap reference: {result['knn_reference']}")
    for key in (
        "loss/heldout_nll",
        "loss/perplexity",
        "ppl_f/ppl_f",
        "entropy/hbar_mean",
        "generation/ev",
        "generation/li",
        "drift/latent_drift",
        "ahd/mean",
        "kv_recall/exact_match_mean",
        "coherence/last/coh",
        "collapse/erank_last",
        "robustness/fgsm_drop",
        "geometry/silhouette_fine",
    ):
        if key in m:
            value = m[key]
            print(f"  {key:32s} {value if value is None else f'{value:.4f}'}")
    for note in result["notes"]:
        print(f"  note: {note}")
    sys.stdout.flush()
