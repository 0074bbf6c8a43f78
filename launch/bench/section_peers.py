"""`loom bench` section `peers`: Loom's step beside Hugging Face Llama and megatron-core's GPTModel."""

from __future__ import annotations

import logging

from loom.launch.bench.alternate import alternate, paired_ratio
from loom.launch.bench.hardware import Hardware, Probe
from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_rate, fmt_time
from loom.launch.bench.shapes import flops_per_token
from loom.launch.bench.workers import worker_groups
from loom.launch.bench.workloads import build_hf_llama, build_loom_plain, build_megatron_gpt

log = logging.getLogger(__name__)


def section_peers(opts: BenchOptions, report: Report) -> None:
    shape, t = opts.shape, opts.threads
    fpt = flops_per_token(shape)
    specs = {
        "loom": (LoomTrainer, 1, t, {"shape": shape}),
        "loom-compiled": (LoomTrainer, 1, t, {"shape": shape, "compile": True}),
        "loom-plain": (build_loom_plain, 1, t, {"shape": shape}),
        "hf": (build_hf_llama, 1, t, {"shape": shape}),
        "megatron": (build_megatron_gpt, 1, t, {"shape": shape}),
        "loom-dp2": (LoomTrainer, 2, 1, {"shape": shape}),
        "hf-dp2": (build_hf_llama, 2, 1, {"shape": shape}),
        "megatron-dp2": (build_megatron_gpt, 2, 1, {"shape": shape}),
        "probe": (Probe, 1, t, {"quick": opts.quick}),
    }
    log.info(f"peers: {shape.describe()}, 1 process × {t} threads and DP=2 (2 processes × 1 thread)")
    hw = Hardware()
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        counts = {name: g.call("param_count")[0] for name, g in groups.items()}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, opts.quiet_wait)
    report.results["hardware_peers"] = hw
    report.results["series_peers"] = series
    dp2 = {name: series.pop(name) for name in ("loom-dp2", "hf-dp2", "megatron-dp2")}
    labels = {
        "loom": "Loom (trainer path: `parallelize` → DeepSpeed engine, ZeRO-0)",
        "loom-compiled": "Loom (trainer path, `train.compile=true`: blocks compiled by inductor)",
        "loom-plain": "Loom (GPTStage module in the peers' loop)",
        "hf": "HF `LlamaForCausalLM` (sdpa)",
        "megatron": "megatron-core `GPTModel` (local spec)",
    }
    rows = []
    for name, s in series.items():
        tps = shape.tokens_per_step / s.median
        rows.append(
            [
                labels[name],
                f"{counts[name] / 1e6:.2f} M",
                fmt_time(s.median),
                fmt_time(s.best),
                fmt_rate(tps),
                f"{tps * fpt / hw.peak_flops * 100:.1f}%",
                f"{paired_ratio(series['loom'], s):.3f}",
                f"{series['loom'].best / s.best:.3f}",
            ]
        )
    report.add(
        f"### Peers: one training step, 1 process × {t} threads",
        "",
        f"Shape: {shape.describe()}. Loop: zero_grad → forward → loss → backward → clip 1.0 → "
        f"AdamW (fused) with Loom's parameter groups; fp32. MFU = tokens/s × {fpt / 1e6:.1f} MFLOP/token "
        f"(`launch.metrics.flops_per_token`) / median probed matmul peak "
        f"({hw.peak_flops / 1e9:.0f} GFLOP/s). Ratios: Loom's (trainer path) step time over this row's, "
        "as the median of per-round ratios and as best step over best step.",
        "",
    )
    report.table(
        [
            "model",
            "parameters",
            "step time (median)",
            "best step",
            "tokens/s",
            "MFU",
            "Loom ÷ this (paired median)",
            "Loom ÷ this (best ÷ best)",
        ],
        rows,
    )
    dp2_labels = {
        "loom-dp2": "Loom DP=2 (trainer path, ZeRO-0)",
        "hf-dp2": "HF `LlamaForCausalLM` (sdpa) in torch DDP",
        "megatron-dp2": "megatron-core `GPTModel` in torch DDP",
    }
    report.add(
        "DP=2: the same global batch on 2 processes × 1 thread (Loom all-reduces through its DeepSpeed "
        "engine after backward; the peers use torch DDP, which overlaps bucketed all-reduces with "
        "backward). Speed-up vs 1 process is against the same model's 2-thread single-process row.",
        "",
    )
    report.table(
        [
            "model",
            "step time (median)",
            "best step",
            "tokens/s",
            "MFU",
            "Loom ÷ this (paired median)",
            "speed-up vs its 1-process row",
        ],
        [
            [
                dp2_labels[name],
                fmt_time(s.median),
                fmt_time(s.best),
                fmt_rate(shape.tokens_per_step / s.median),
                f"{shape.tokens_per_step / s.median * fpt / hw.peak_flops * 100:.1f}%",
                f"{paired_ratio(dp2['loom-dp2'], s):.3f}",
                f"{paired_ratio(series[name.removesuffix('-dp2')], s):.2f}×",
            ]
            for name, s in dp2.items()
        ],
    )
    report.results["peers_dp2"] = {
        "loom/hf": paired_ratio(dp2["loom-dp2"], dp2["hf-dp2"]),
        "loom/megatron": paired_ratio(dp2["loom-dp2"], dp2["megatron-dp2"]),
        "best": {n: s.best for n, s in dp2.items()},
    }
    report.results["series_peers_dp2"] = dp2
    loom_hf, loom_mg = paired_ratio(series["loom"], series["hf"]), paired_ratio(series["loom"], series["megatron"])
    report.results["peers"] = {
        "loom/hf": loom_hf,
        "loom/megatron": loom_mg,
        "best": {n: s.best for n, s in series.items()},
        "loom-plain/hf": paired_ratio(series["loom-plain"], series["hf"]),
        "loom/loom-plain": paired_ratio(series["loom"], series["loom-plain"]),
        "loom-compiled/hf": paired_ratio(series["loom-compiled"], series["hf"]),
        "loom-compiled/megatron": paired_ratio(series["loom-compiled"], series["megatron"]),
        "loom-compiled/loom": paired_ratio(series["loom-compiled"], series["loom"]),
        "step": {n: s.median for n, s in series.items()},
    }
