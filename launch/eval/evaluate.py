"""`loom eval`: held-out loss and every evaluation metric of docs/techniques.md on a checkpoint.

The checkpoint's network is rebuilt at its own tensor/pipeline layout (`meta.json` holds the resolved
run config and the layout). A ZeRO 0-2 checkpoint's weights are read from the DeepSpeed model-state
file of each model-parallel rank; a ZeRO-3 one is consolidated into full weights first, and a
consolidated folder is read from safetensors (`launch.eval.checkpoint`). Run it as one process for
TP = PP = 1, or under torchrun with any multiple of TP×PP processes: the extra factor is data
parallelism over documents, probes and prompts. Every forward goes through the pipeline
(`forward_only`), logits stay vocab-parallel (`techniques.metrics.entropy` does the M/S/U reductions
over the TP group), hidden states and attention maps are read by hooks on the stage that owns the
layer, and all per-rank records are gathered to global rank 0, which computes the metrics with the
pure functions of `techniques.metrics` and writes JSON and TensorBoard scalars.

Metric families (`--metrics`, default all; `loom eval --list` describes them) are listed in
`FAMILIES`. Sizes come from a named profile (`--profile`): `spec`, the default, has the sizes the metrics'
definitions ask for (hours on a CPU); `quick` evaluates a small model in about a minute on a CPU. `--set
KEY=VALUE` overrides single knobs of `EvalSettings` on top. The results name the profile, and what the
kNN overlap compared with (`--set reference=CHECKPOINT`, else the run's own step-0 table).

The pieces, in the order one evaluation uses them:

    settings    metric families, `EvalSettings`, parsing of --metrics / --set
    checkpoint  reading a checkpoint's weights into a stage (ZeRO 0-3, consolidated folders)
    model       `EvalModel`: this rank's stage, teacher-forced and greedy forwards
    data        held-out stream, documents, probe filler, training-token counts
    runner      `Evaluator`: runs the families on this rank, built from
                passes (loss, document pass, gains), attention (AHD),
                probes (generation, recall, numerical), embedding (robustness, geometry)
    aggregate   rank 0: records → metrics; the run's TensorBoard logs
    report      JSON, TensorBoard scalars, console summary
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from loom.launch.checkpoint.layout import CHECKPOINTS
from loom.launch.checkpoint.locate import locate_checkpoint
from loom.launch.eval.aggregate import aggregate, read_run_logs
from loom.launch.eval.data import (
    read_heldout,
    select_heldout,
    training_token_counts,
)
from loom.launch.eval.model import EvalModel
from loom.launch.eval.report import json_safe, print_summary, write_json, write_tensorboard
from loom.launch.eval.runner import Evaluator
from loom.launch.eval.settings import (
    COUNT_FAMILIES,
    FAMILIES,
    RUN_LOG_FAMILIES,
    EvalSettings,
    parse_families,
    parse_settings,
    profile_overrides,
)
from loom.model.parallel import comm

log = logging.getLogger(__name__)


def evaluate(
    checkpoint: str,
    data: Optional[str],
    families: list[str],
    settings: EvalSettings,
    out: Optional[str],
    tb: Optional[str],
    train_data: Optional[str] = None,
    trust_pickles: bool = False,
) -> Optional[dict]:
    """Collective over the world. Returns the result dict on rank 0 (None elsewhere)."""
    start = time.perf_counter()
    folder = locate_checkpoint(checkpoint)
    model = EvalModel(folder, trust_pickles)
    log.info(
        f"eval: {folder} (step {model.step}) · layout DP {model.layout.dp} × PP {model.layout.pp} × "
        f"TP {model.layout.tp} · {len(families)} metric families"
    )
    tokenizer, held, counts = _load_data(folder, model.cfg, data, train_data, families, settings)
    log.info(
        f"eval: held-out data from {held.source}: {len(held.stream):,} tokens, {len(held.docs)} documents "
        f"for the document pass"
    )
    ev = Evaluator(model, tokenizer, held, counts, settings, families)
    ev.run()
    gathered = comm.gather_object(ev.records, dst=0)
    notes_all = comm.gather_object(ev.notes, dst=0)
    if dist.get_rank() != 0:
        return None
    # a step folder's run directory; a consolidated folder keeps its results beside its weights
    run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS else folder
    logs = read_run_logs(run_dir) if set(families) & RUN_LOG_FAMILIES else {}
    metrics = aggregate(gathered, ev, logs)
    notes = sorted({n for ns in notes_all for n in ns})
    result = {
        "checkpoint": str(folder.resolve()),
        "step": model.step,
        "data": held.source,
        "families": families,
        "layout": {"dp": model.layout.dp, "pp": model.layout.pp, "tp": model.layout.tp},
        "profile": settings.profile,
        "overrides": profile_overrides(settings),
        "settings": asdict(settings),
        "rare_gap": ev.rare_gap,
        "knn_reference": ev.knn_reference,
        "notes": notes,
        "metrics": {k: json_safe(float(v)) for k, v in sorted(metrics.items())},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out_path = Path(out) if out else run_dir / "eval" / f"eval_step_{model.step:08d}.json"
    write_json(result, out_path)
    tb_dir = tb or str(run_dir / "tensorboard")
    write_tensorboard(metrics, tb_dir, model.step)
    result["out"], result["tb"] = str(out_path), tb_dir
    return result


def _load_data(
    folder: Path, cfg, data: Optional[str], train_data: Optional[str], families: list[str], settings: EvalSettings
):
    """(tokenizer, Heldout, training-token counts or None), read on rank 0 and broadcast."""
    from loom.data.tokenizer import Tokenizer
    from loom.launch.train.prepare_data import prepare_data

    tok_path = folder / "tokenizer.model"
    prepared = None
    if train_data is None or data is None or not tok_path.is_file():
        try:
            prepared = prepare_data(cfg.data, cfg.model.seq_length, cfg.model.vocab_size)
        except ValueError as exc:
            log.warning(f"the run's data could not be prepared ({exc})")
    tokenizer = Tokenizer(tok_path if tok_path.is_file() else prepared.tokenizer)
    source = data or (prepared.eval if prepared else None)
    if not source:
        raise ValueError("no held-out data: pass --data (a shard manifest, a built-in corpus or text files)")
    box: list = [None, None]
    if dist.get_rank() == 0:
        stream, label = read_heldout(source, tokenizer, settings, cfg.data.cache_dir)
        from_manifest = label.startswith("manifest")
        box[0] = select_heldout(stream, tokenizer, label, settings, cfg.model.seq_length, from_manifest)
        box[1] = (
            training_token_counts(train_data or (prepared.train if prepared else None), cfg.model.vocab_size)
            if set(families) & COUNT_FAMILIES
            else None
        )
    held, counts = comm.broadcast_object(box, src=0)
    return tokenizer, held, counts


def eval_from_cli(args) -> int:
    from loom.launch.runtime.env import init_distributed, read_dist_env

    if args.list:
        for name, text in FAMILIES.items():
            print(f"{name:12s} {text}")
        return 0
    if not args.checkpoint:
        raise ValueError("give a checkpoint folder (or run directory)")
    families = parse_families(args.metrics)
    settings = parse_settings(args.set or [], args.profile)
    locate_checkpoint(args.checkpoint)  # fail before any process group
    denv = read_dist_env()
    init_distributed(denv, 1800.0)
    try:
        result = evaluate(
            args.checkpoint, args.data, families, settings, args.out, args.tb, args.train_data, args.trust_checkpoint
        )
        if result is not None:
            print_summary(result)
        return 0
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
