"""`loom bench` section `zero`: per-rank memory of ZeRO 0-3 against theory."""

from __future__ import annotations

import logging
import statistics

from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_time
from loom.launch.bench.workers import worker_groups

log = logging.getLogger(__name__)


def section_zero(opts: BenchOptions, report: Report) -> None:
    shape = opts.shape
    log.info("zero: DP2, stages 0-3, per-rank bytes")
    rows = []
    results = {}
    for zero in (0, 1, 2, 3):
        with worker_groups(
            {f"zero{zero}": (LoomTrainer, 2, 1, {"shape": shape, "zero": zero, "microbatches": 2})}
        ) as groups:
            group = groups[f"zero{zero}"]
            group.call("measure", steps=1)
            m = max(group.call("zero_bytes"), key=lambda d: d["params"] + d["optimizer"])
            seconds = statistics.median(max(ts) for ts in zip(*group.call("measure", steps=max(2, opts.steps))))
        full = m["params_full"]  # fp32 bytes of the whole model = 4Ψ
        n = 2
        theory = {  # fp32 DeepSpeed: ZeRO-1/2/3 keep an fp32 master partition next to Adam's two moments
            0: (full, full, 2 * full),
            1: (full, full, 3 * full / n),
            2: (full, full / n, 3 * full / n),
            3: (full / n, full / n, 3 * full / n),
        }[zero]
        measured = (m["params"], m["grads_between_microbatches"], m["optimizer"])
        results[zero] = {"measured": measured, "theory": theory, "buckets": m["buckets"]}
        rows.append(
            [f"ZeRO-{zero}"]
            + [f"{fmt_bytes(a)} ({a / b:.2f}×)" for a, b in zip(measured, theory)]
            + [fmt_bytes(sum(measured)), fmt_bytes(sum(theory)), fmt_bytes(m["buckets"]), fmt_time(seconds)]
        )
    report.add(
        "### ZeRO stages: per-rank bytes on DP=2 against theory",
        "",
        f"Ψ = {full / 4 / 1e6:.2f} M parameters (fp32, 4Ψ = {fmt_bytes(full)}). Theory per rank for fp32 "
        "DeepSpeed with N=2: ZeRO-0 params 4Ψ, grads 4Ψ, optimizer 8Ψ (torch AdamW moments); ZeRO-1 "
        "optimizer 12Ψ/N (fp32 master partition + moments); ZeRO-2 also grads 4Ψ/N; ZeRO-3 also params 4Ψ/N. "
        "Gradients are measured between the two micro-batches of a step (ZeRO-1 holds full gradients "
        "there, ZeRO-2/3 only their partition); each cell shows measured (measured / theory). "
        "Reduce buckets are DeepSpeed's communication buffers (`parallel.reduce_bucket_size` elements, "
        "not in the theory; the largest seen during or after the step). "
        "Step time: 2 micro-batches, not alternated (indicative only).",
        "",
    )
    report.table(
        [
            "stage",
            "params",
            "grads",
            "optimizer state",
            "measured total",
            "theory total",
            "reduce buckets",
            "step time",
        ],
        rows,
    )
    report.results["zero"] = results
