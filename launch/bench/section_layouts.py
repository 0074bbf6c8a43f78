"""`loom bench` section `layouts`: data, tensor and pipeline parallelism against one process."""

from __future__ import annotations

import dataclasses
import logging

from loom.launch.bench.alternate import alternate, paired_ratio
from loom.launch.bench.hardware import Hardware, Probe
from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_rate, fmt_time
from loom.launch.bench.shapes import flops_per_token
from loom.launch.bench.workers import worker_groups

log = logging.getLogger(__name__)

ACCUMULATION = 4
"""Micro-batches of the shape's batch per optimizer step in the gradient-accumulation DP pair."""
ONE_ACCUM, DP_ACCUM = "accum: 1 process × 1 thread", "accum: DP2 (ZeRO-0)"


def section_layouts(opts: BenchOptions, report: Report) -> None:
    shape, t = opts.shape, opts.threads
    pp_micro = 4 if shape.batch % 4 == 0 else 2
    # Data parallelism as it is used: every rank keeps the micro-batch size and the global batch
    # grows; the all-reduce and optimizer step are then paid once per ACCUMULATION micro-batches.
    accum = dataclasses.replace(shape, batch=shape.batch * ACCUMULATION)
    specs = {
        f"1 process × {t} threads": (LoomTrainer, 1, t, {"shape": shape}),
        "1 process × 1 thread": (LoomTrainer, 1, 1, {"shape": shape}),
        "DP2 (ZeRO-0)": (LoomTrainer, 2, 1, {"shape": shape}),
        "DP2 (ZeRO-1)": (LoomTrainer, 2, 1, {"shape": shape, "zero": 1}),
        "DP2 (ZeRO-1, overlap_comm)": (LoomTrainer, 2, 1, {"shape": shape, "zero": 1, "overlap_comm": True}),
        "TP2": (LoomTrainer, 2, 1, {"shape": shape, "tp": 2}),
        f"PP2 ({pp_micro} micro-batches)": (LoomTrainer, 2, 1, {"shape": shape, "pp": 2, "microbatches": pp_micro}),
        ONE_ACCUM: (LoomTrainer, 1, 1, {"shape": accum, "microbatches": ACCUMULATION}),
        DP_ACCUM: (LoomTrainer, 2, 1, {"shape": accum, "microbatches": ACCUMULATION // 2}),
        "probe": (Probe, 1, t, {"quick": opts.quick}),
    }
    log.info(f"layouts: global batch {shape.batch} (and {accum.batch} with accumulation)")
    hw = Hardware()
    fpt = flops_per_token(shape)
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, opts.quiet_wait)
        state = {name: g.call("state_bytes") for name, g in groups.items()}
    names = list(series)
    one_t, one_1 = series[names[0]], series[names[1]]
    accum_series = {name: series.pop(name) for name in (ONE_ACCUM, DP_ACCUM)}
    rows = []
    for name, s in series.items():
        tps = shape.tokens_per_step / s.median
        per_rank = max(m["params"] + m["optimizer"] for m in state[name])
        rows.append(
            [
                name,
                fmt_time(s.median),
                fmt_time(s.best),
                fmt_rate(tps),
                f"{tps * fpt / hw.peak_flops * 100:.1f}%",
                f"{paired_ratio(one_t, s):.2f}×",
                f"{paired_ratio(one_1, s):.2f}×",
                fmt_bytes(per_rank),
            ]
        )
    report.add(
        f"### Parallel layouts on this machine (global batch {shape.batch} × {shape.seq})",
        "",
        "Ranks of multi-process layouts run 1 thread each (2 ranks on 2 cores). "
        "Speed-up = paired median of (reference step time / this step time), i.e. the tokens/s ratio. "
        "Per-rank bytes = parameters + optimizer state (moments and DeepSpeed's fp32 master copy) "
        "held by the largest rank after a step.",
        "",
    )
    report.table(
        [
            "layout",
            "step time",
            "best step",
            "tokens/s",
            "MFU",
            f"speed-up vs 1p×{t}t",
            "speed-up vs 1p×1t",
            "params + optimizer / rank",
        ],
        rows,
    )
    report.results["layouts"] = {
        name: {
            "vs_1p_threads": paired_ratio(one_t, s),
            "vs_1p_1t": paired_ratio(one_1, s),
            "best_vs_1p_threads": one_t.best / s.best,
            "best_vs_1p_1t": one_1.best / s.best,
            "tokens_per_s": shape.tokens_per_step / s.median,
        }
        for name, s in series.items()
    }
    one, dp = accum_series[ONE_ACCUM], accum_series[DP_ACCUM]
    report.add(
        f"Gradient accumulation, global batch {accum.batch} × {shape.seq}: micro-batches of {shape.batch}, "
        f"{ACCUMULATION} per step on 1 process × 1 thread and {ACCUMULATION // 2} per rank on DP2 "
        f"(1 thread each): {fmt_time(one.median)} vs {fmt_time(dp.median)} per step, DP2 speed-up "
        f"{paired_ratio(one, dp):.2f}× (best ÷ best {one.best / dp.best:.2f}×).",
        "",
    )
    report.results["layouts_accumulation"] = {
        "vs_1p_1t": paired_ratio(one, dp),
        "best_vs_1p_1t": one.best / dp.best,
        "accumulation": ACCUMULATION,
    }
    report.results["hardware_layouts"] = hw
    report.results["series_layouts"] = series
    report.results["series_layouts_accumulation"] = accum_series
