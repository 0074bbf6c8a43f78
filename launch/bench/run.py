"""`run_bench`: the selected sections in order, then the report with the run's machine and load."""

from __future__ import annotations

import datetime
import logging
import math
import os
import platform
import statistics
import time

from loom.launch.bench.alternate import LOAD
from loom.launch.bench.hardware import QUIET_CORES
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, hardware_table, targets_table
from loom.launch.bench.sections import SECTIONS
from loom.launch.bench.workers import preimport

log = logging.getLogger(__name__)


def run_bench(opts: BenchOptions) -> Report:
    """Run the selected sections and return the report (markdown in `report.text()`); progress goes to
    the `loom.launch.bench` loggers."""
    preimport()
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    LOAD.clear()
    body = Report()
    body.results["options"] = opts
    for name in opts.sections:
        t0 = time.perf_counter()
        SECTIONS[name](opts, body)
        log.info(f"{name}: {time.perf_counter() - t0:.0f}s")
        if name in ("peers", "layouts"):
            _record_training_rate(body, opts)
    report = Report(results=body.results)
    import torch

    report.add(
        f"## `loom bench` — {opts.shape.name} shape",
        "",
        f"{platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; load average at start "
        f"{load_at_start:.1f}; {_load_summary()}; "
        f"{opts.rounds} alternating rounds × {opts.steps} step(s) after "
        f"{opts.warmup} warm-up step(s); {datetime.datetime.now():%Y-%m-%d %H:%M}.",
        "",
    )
    hardware_table(report, opts)
    targets_table(report)
    report.lines += body.lines
    report.add(
        f"Total benchmark time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}."
    )
    return report


def _load_summary() -> str:
    """How much the rest of the machine ran while configurations were measured."""
    values = [v for v in LOAD if not math.isnan(v)]
    if not values:
        return "others' CPU use not measured"
    quiet = sum(v < QUIET_CORES for v in values)
    return (
        f"during measurements the rest of the machine took {statistics.median(values):.2f} of the cores a "
        f"configuration used (median; max {max(values):.2f}), {quiet} of {len(values)} measurements quiet "
        f"(< {QUIET_CORES} cores)"
    )


def _record_training_rate(report: Report, opts: BenchOptions) -> None:
    best = report.results.get("training_tokens_per_s", 0.0)
    if "peers" in report.results:
        best = max(best, opts.shape.tokens_per_step / report.results["peers"]["step"]["loom"])
    for layout in report.results.get("layouts", {}).values():
        best = max(best, layout["tokens_per_s"])
    report.results["training_tokens_per_s"] = best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
