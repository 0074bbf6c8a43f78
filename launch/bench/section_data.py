"""`loom bench` section `data`: the streaming loader against what training consumes."""

from __future__ import annotations

import logging

from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_rate, fmt_time
from loom.launch.bench.workers import worker_groups
from loom.launch.bench.workloads import DataPath

log = logging.getLogger(__name__)


def section_data(opts: BenchOptions, report: Report) -> None:
    shape = opts.shape
    log.info(f"data: corpus {opts.corpus}")
    consumed = report.results.get("training_tokens_per_s")
    with worker_groups(
        {
            "data": (
                DataPath,
                1,
                1,
                {
                    "corpus": opts.corpus,
                    "seq": shape.seq,
                    "micro_batch": shape.batch,
                    "max_docs": opts.data_docs,
                    "vocab_size": 1024 if opts.quick else 8192,
                },
            )
        }
    ) as groups:
        g = groups["data"]
        enc1 = g.call("encode", threads=1)[0]
        enc2 = g.call("encode", threads=2)[0]
        loads = {w: g.call("load", num_workers=w, batches=opts.loader_batches)[0] for w in (0, 1)}
        blend = g.call("load_mixture", num_workers=1, batches=opts.loader_batches)[0]
    rows = []

    def ratio(tps):
        return f"{tps / consumed:,.0f}×" if consumed else "–"

    for label, e in (("SentencePiece encode, 1 thread", enc1), ("SentencePiece encode, 2 threads", enc2)):
        tps = e["tokens"] / e["seconds"]
        rows.append(
            [
                label,
                f"{e['tokens'] / 1e6:.2f} M tokens ({e['megabytes']:.1f} MB)",
                fmt_time(e["seconds"]),
                f"{tps / 1e6:.2f} M",
                ratio(tps),
            ]
        )
    for w, r in loads.items():
        tps = r["tokens"] / r["seconds"]
        rows.append(
            [
                f"loader, num_workers={w}, [{shape.batch}, {shape.seq + 1}] batches",
                f"{r['tokens'] / 1e6:.2f} M tokens",
                fmt_time(r["seconds"]),
                f"{tps / 1e6:.2f} M",
                ratio(tps),
            ]
        )
    blend_tps = blend["tokens"] / blend["seconds"]
    rows.append(
        [
            f"loader, {blend['sources']}-source mixture (0.5/0.3/0.2), num_workers=1",
            f"{blend['tokens'] / 1e6:.2f} M tokens",
            fmt_time(blend["seconds"]),
            f"{blend_tps / 1e6:.2f} M",
            ratio(blend_tps),
        ]
    )
    report.add(
        f"### Data path vs training consumption (corpus `{opts.corpus}`)",
        "",
        f"Training consumes {fmt_rate(consumed) if consumed else '?'} tokens/s (fastest Loom layout of "
        "this run). Loader throughput includes the first batch (worker start-up).",
        "",
    )
    report.table(["stage", "work", "time", "tokens/s", "× training"], rows)
    loader_best = max(r["tokens"] / r["seconds"] for r in loads.values())
    report.results["data"] = {
        "loader_tokens_per_s": loader_best,
        "encode_tokens_per_s": enc1["tokens"] / enc1["seconds"],
        "loader_vs_training": loader_best / consumed if consumed else None,
        "mixture_tokens_per_s": blend_tps,
        "mixture_vs_training": blend_tps / consumed if consumed else None,
    }
