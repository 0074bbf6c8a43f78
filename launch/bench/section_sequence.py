"""`loom bench` section `sequence`: what sequence parallelism saves, per rank, at TP 2 and 4."""

from __future__ import annotations

import logging

from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_time
from loom.launch.bench.section_techniques import technique_configs
from loom.launch.bench.workers import worker_groups

log = logging.getLogger(__name__)

TENSOR_SIZES = (2, 4)


def _activation_bytes(group) -> tuple[int, int]:
    """(all, hidden-width) saved-for-backward bytes of the rank that holds the most (TP ranks hold about
    the same)."""
    reports = group.call("memory_report")
    return max(m["activations"] for m in reports), max(m["activations_hidden_width"] for m in reports)


def section_sequence(opts: BenchOptions, report: Report) -> None:
    shape = opts.shape
    techniques = {"baseline": None, "all five": technique_configs(shape)["all five"]}
    rows, results = [], {}
    for tp in TENSOR_SIZES:
        for tech_name, tech in techniques.items():
            log.info(f"sequence: TP{tp} {tech_name}, with and without sequence parallelism")
            specs = {
                sp: (LoomTrainer, tp, 1, {"shape": shape, "tp": tp, "tech": tech, "sequence_parallel": sp})
                for sp in (False, True)
            }
            with worker_groups(specs) as groups:
                for group in groups.values():
                    group.call("measure", steps=1)  # warm-up (and HCMA's first refresh) outside the meter
                acts = {sp: _activation_bytes(g) for sp, g in groups.items()}
                times = {sp: min(max(ts) for ts in zip(*g.call("measure", steps=2))) for sp, g in groups.items()}
            (total_off, wide_off), (total_on, wide_on) = acts[False], acts[True]
            results[f"tp{tp} {tech_name}"] = {
                "without": total_off,
                "with": total_on,
                "ratio": total_on / total_off,
                "hidden_width_without": wide_off,
                "hidden_width_with": wide_on,
                "hidden_width_ratio": wide_on / wide_off,
            }
            rows.append(
                [
                    f"TP{tp}",
                    tech_name,
                    f"{fmt_bytes(wide_off)} → {fmt_bytes(wide_on)}",
                    f"{wide_on / wide_off:.3f}",
                    f"{1 / tp:.3f}",
                    f"{fmt_bytes(total_off)} → {fmt_bytes(total_on)}",
                    f"{total_on / total_off:.3f}",
                    f"{fmt_time(times[False])} → {fmt_time(times[True])}",
                ]
            )
    report.add(
        f"### Sequence parallelism: activation memory per rank ({shape.seq} tokens × batch {shape.batch})",
        "",
        "Bytes saved for backward by one training step on the rank holding the most (distinct storages, "
        "`torch.autograd.graph.saved_tensors_hooks`), without → with sequence parallelism. Hidden-width: the "
        "tensors saved d wide (the residual stream, the norms' inputs, the column-parallel layers' inputs, the "
        "techniques' per-token states): tensor parallelism leaves these whole on every rank and sequence "
        "parallelism splits them, so their target is 1/TP. All: every saved tensor, including what TP already "
        "splits by heads, FFN width or vocabulary (attention and MLP internals, the logits), which SP leaves as "
        "it is; the ratio tends to 1/TP as d grows against those. Step time: best of 2 steps, not alternated "
        "(indicative only: TP ranks share 2 cores, and on a CPU the extra collectives cost more than on GPUs).",
        "",
    )
    report.table(
        [
            "TP",
            "techniques",
            "hidden-width activations / rank",
            "ratio",
            "target 1/TP",
            "all activations / rank",
            "ratio",
            "step time",
        ],
        rows,
    )
    report.results["sequence"] = results
