"""The markdown report: formatting, and the tables that draw on several sections (hardware, targets)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from loom.launch.bench.alternate import quiet_paired_ratio
from loom.launch.bench.hardware import QUIET_CORES
from loom.launch.bench.options import BenchOptions


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def fmt_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self.lines.append("| " + " | ".join(str(c) for c in row) + " |")
        self.lines.append("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def target_verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    if ok:
        return f"met ({value:.2f} vs {target:.2f})"
    gap = value / target - 1 if lower_is_better else 1 - value / target
    return f"**missed** by {abs(gap) * 100:.0f}% ({value:.2f} vs {target:.2f})"


def hardware_table(report: Report, opts: BenchOptions) -> None:
    hws = [h for k in ("hardware_peers", "hardware_layouts") if (h := report.results.get(k))]
    flops = [f for h in hws for f in h.flops]
    bw = [b for h in hws for b in h.bandwidth]
    if not flops:
        return
    report.add(f"### Hardware ceiling (measured in this run, {opts.threads} threads, every round)", "")
    labels = hws[0].labels
    report.table(
        ["probe", "median", "min", "max", "samples"],
        [
            [
                labels[0],
                f"{statistics.median(flops) / 1e9:.0f} GFLOP/s",
                f"{min(flops) / 1e9:.0f}",
                f"{max(flops) / 1e9:.0f}",
                len(flops),
            ],
            [
                labels[1],
                f"{statistics.median(bw) / 1e9:.1f} GB/s",
                f"{min(bw) / 1e9:.1f}",
                f"{max(bw) / 1e9:.1f}",
                len(bw),
            ],
        ],
    )


def targets_table(report: Report) -> None:
    """The issue's targets, judged on the paired median of all rounds; beside it best ÷ best and the
    paired median of the quiet rounds only (the rest of the machine idle on both sides)."""
    r = report.results
    rows = []

    def row(text, median, best, quiet, target, lower=True):
        q, n = quiet if quiet is not None else (None, 0)
        basis = q if q is not None else median  # quiet rounds when there are enough of them
        verdict = target_verdict(basis, target, lower_is_better=lower) + (" (quiet rounds)" if q is not None else "")
        estimates = [v for v in (median, best, q) if v is not None]
        if len(estimates) > 1 and min(estimates) <= target <= max(estimates):
            verdict += "; uncertain: the estimates straddle the target"
        rows.append(
            [
                text,
                f"{median:.3f}",
                "–" if best is None else f"{best:.3f}",
                f"{q:.3f} ({n})" if q is not None else f"– ({n})",
                verdict,
            ]
        )

    if "peers" in r:
        p, sp = r["peers"], r["series_peers"]
        row(
            "Loom step ≤ 0.90× HF Llama (sdpa)",
            p["loom/hf"],
            p["best"]["loom"] / p["best"]["hf"],
            quiet_paired_ratio(sp["loom"], sp["hf"]),
            0.90,
        )
        row(
            "Loom step ≤ 0.90× megatron-core GPTModel",
            p["loom/megatron"],
            p["best"]["loom"] / p["best"]["megatron"],
            quiet_paired_ratio(sp["loom"], sp["megatron"]),
            0.90,
        )
        if "peers_dp2" in r:
            p2, s2 = r["peers_dp2"], r["series_peers_dp2"]
            for peer, text in (("hf", "HF Llama (sdpa) in DDP"), ("megatron", "megatron-core GPTModel in DDP")):
                row(
                    f"Loom DP=2 step ≤ 0.90× {text}",
                    p2[f"loom/{peer}"],
                    p2["best"]["loom-dp2"] / p2["best"][f"{peer}-dp2"],
                    quiet_paired_ratio(s2["loom-dp2"], s2[f"{peer}-dp2"]),
                    0.90,
                )
        for peer, text in (("hf", "HF Llama (sdpa, eager)"), ("megatron", "megatron-core GPTModel (eager)")):
            row(
                f"Loom compiled step ≤ 0.90× {text}",
                p[f"loom-compiled/{peer}"],
                p["best"]["loom-compiled"] / p["best"][peer],
                quiet_paired_ratio(sp["loom-compiled"], sp[peer]),
                0.90,
            )
    if "techniques" in r:
        st = r["series_techniques"]
        for name, v in r["techniques"].items():
            quiet = quiet_paired_ratio(st[name], st["baseline"])
            if name.startswith("baseline ("):
                q, n = quiet
                rows.append(
                    [
                        f"(noise floor: {name}, ideally 1.00)",
                        f"{v['time']:.3f}",
                        f"{v['best']:.3f}",
                        f"{q:.3f} ({n})" if q is not None else f"– ({n})",
                        "–",
                    ]
                )
            elif name != "baseline":
                limit = 1.10 if name == "all five" else 1.03
                row(f"{name}: step ≤ {limit:.2f}× baseline", v["time"], v["best"], quiet, limit)
    if "layouts" in r:
        dp, sl = r["layouts"].get("DP2 (ZeRO-0)"), r["series_layouts"]
        if dp:
            names = list(sl)
            row(
                "DP=2 tokens/s ≥ 1.8× one process (1 thread each)",
                dp["vs_1p_1t"],
                dp["best_vs_1p_1t"],
                quiet_paired_ratio(sl[names[1]], sl["DP2 (ZeRO-0)"]),
                1.8,
                lower=False,
            )
            row(
                "DP=2 tokens/s ≥ 1.8× one process (2 threads: the whole machine)",
                dp["vs_1p_threads"],
                dp["best_vs_1p_threads"],
                quiet_paired_ratio(sl[names[0]], sl["DP2 (ZeRO-0)"]),
                1.8,
                lower=False,
            )
    if "layouts_accumulation" in r:
        acc, sa = r["layouts_accumulation"], r["series_layouts_accumulation"]
        one, dp = list(sa.values())
        row(
            f"DP=2 tokens/s ≥ 1.8× one process (1 thread each), {acc['accumulation']} micro-batches per step",
            acc["vs_1p_1t"],
            acc["best_vs_1p_1t"],
            quiet_paired_ratio(one, dp),
            1.8,
            lower=False,
        )
    if "data" in r and r["data"]["loader_vs_training"]:
        row("loader ≥ 20× training consumption", r["data"]["loader_vs_training"], None, None, 20.0, lower=False)
    if rows:
        report.add(
            "### Targets",
            "",
            f"'Quiet rounds' is the paired median over the rounds in which the rest of the machine took "
            f"< {QUIET_CORES} of the cores in use during both measurements (/proc/stat minus the workers' "
            "own CPU time, less the cores a configuration leaves idle; their number in brackets; "
            "– when fewer than 3). "
            "Verdicts use it when it exists, else the paired median over all rounds; a verdict is marked "
            "uncertain when the estimates (all rounds, best ÷ best, quiet rounds) fall on both sides of "
            "the target.",
            "",
        )
        report.table(
            ["target", "paired median, all rounds", "best ÷ best", "paired median, quiet rounds", "verdict"], rows
        )
