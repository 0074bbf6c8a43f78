"""The benchmark's sections: each starts its worker groups, measures, and adds its table to the report."""

from __future__ import annotations

import dataclasses
import statistics

from loom.launch.bench.alternate import alternate, paired_ratio
from loom.launch.bench.hardware import Hardware, Probe
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_rate, fmt_time, target_verdict
from loom.launch.bench.shapes import Shape, flops_per_token
from loom.launch.bench.trainer import LoomTrainer
from loom.launch.bench.workers import worker_groups
from loom.launch.bench.workloads import DataPath, build_hf_llama, build_loom_plain, build_megatron_gpt


def section_peers(opts: BenchOptions, report: Report, log) -> None:
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
    log(f"peers: {shape.describe()}, 1 process × {t} threads and DP=2 (2 processes × 1 thread)")
    hw = Hardware()
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        counts = {name: g.call("param_count")[0] for name, g in groups.items()}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, log, opts.quiet_wait)
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


def technique_configs(shape: Shape) -> dict:
    """Each technique alone with the spec's defaults, and all five together. SCA's L_field warm-up
    is set to 0 so its full cost is measured; HCMA's refresh runs at step 0 (before timing)."""
    from loom.techniques.config import TechniquesConfig

    def make(*names):
        tech = TechniquesConfig()
        for name in names:
            getattr(tech, name).enabled = True
        tech.sca.warmup_steps = 0
        if shape.name == "quick":  # sized for the tiny shape so every path runs
            tech.lcm.K, tech.scr.rank, tech.cmr.rank, tech.sca.rank, tech.sca.window = 4, 8, 8, 8, 16
            tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = 4, 16, 16, 4
        return tech

    configs = {"baseline": make(), "baseline (A/A control)": make()}
    for name in ("lcm", "scr", "cmr", "sca", "hcma"):
        configs[name] = make(name)
    configs["all five"] = make("lcm", "scr", "cmr", "sca", "hcma")
    return configs


def section_techniques(opts: BenchOptions, report: Report, log) -> None:
    shape, t = opts.shape, opts.threads
    configs = technique_configs(shape)
    specs = {name: (LoomTrainer, 1, t, {"shape": shape, "tech": tech}) for name, tech in configs.items()}
    log(f"techniques: {len(configs)} configurations, 1 process × {t} threads")
    with worker_groups(specs) as groups:
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, None, Hardware(), log, opts.quiet_wait)
        memory = {name: g.call("memory_report")[0] for name, g in groups.items()}
        refresh = {name: g.call("hcma_refresh_seconds")[0] for name, g in groups.items() if configs[name].hcma.enabled}
    base = series["baseline"]
    report.results["series_techniques"] = series

    def tensor_total(m):
        return m["params"] + m["grads"] + m["optimizer"] + m["buffers"] + m["technique_state"] + m["activations"]

    rows, ratios = [], {}
    for name, s in series.items():
        m = memory[name]
        time_ratio = paired_ratio(s, base)
        mem_ratio = tensor_total(m) / tensor_total(memory["baseline"])
        act_ratio = m["activations"] / memory["baseline"]["activations"]
        rss_growth = (m["rss_high_water_kb"] - memory["baseline"]["rss_high_water_kb"]) / 1024
        target = 1.10 if name == "all five" else 1.03
        ratios[name] = {"time": time_ratio, "memory": mem_ratio, "best": s.best / base.best}
        rows.append(
            [
                name,
                fmt_time(s.median),
                f"{time_ratio:.3f}",
                f"{s.best / base.best:.3f}",
                "–" if name.startswith("baseline") else target_verdict(time_ratio, target),
                fmt_bytes(tensor_total(m)),
                f"{mem_ratio:.3f}",
                f"{act_ratio:.3f}",
                f"{m['rss_high_water_kb'] / 1024:.0f} MiB ({rss_growth:+.0f})",
            ]
        )
    report.add(
        f"### Technique overhead (Loom trainer path, 1 process × {t} threads, same shape)",
        "",
        "Spec defaults (`techniques/config.py`), except SCA's `warmup_steps=0` so L_field is live. "
        "Memory = tensor bytes at the step's peak: parameters + gradients (taken just before the "
        "optimizer step) + AdamW state + buffers + "
        "technique state + activations saved for backward (distinct storages, counted with "
        "`torch.autograd.graph.saved_tensors_hooks`). RSS high-water is `ru_maxrss` of the config's own "
        "worker process (± vs baseline; allocator caching makes it coarse). The A/A control is a second, "
        "identical baseline process: its ratio is the noise floor of this table.",
        "",
    )
    report.table(
        [
            "config",
            "step time",
            "time / baseline (paired median)",
            "best ÷ best",
            "target",
            "tensor bytes at peak",
            "memory / baseline",
            "activations / baseline",
            "RSS high-water",
        ],
        rows,
    )
    for name, seconds in refresh.items():
        every = configs[name].hcma.refresh_every
        report.add(
            f"HCMA refresh ({name}): {fmt_time(seconds)} every {every} steps = "
            f"{seconds / every / base.median * 100:.2f}% of a baseline step, amortised (not in the step times)."
        )
    report.add("")
    report.results["techniques"] = ratios


ACCUMULATION = 4
"""Micro-batches of the shape's batch per optimizer step in the gradient-accumulation DP pair."""
ONE_ACCUM, DP_ACCUM = "accum: 1 process × 1 thread", "accum: DP2 (ZeRO-0)"


def section_layouts(opts: BenchOptions, report: Report, log) -> None:
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
        "TP2": (LoomTrainer, 2, 1, {"shape": shape, "tp": 2}),
        f"PP2 ({pp_micro} micro-batches)": (LoomTrainer, 2, 1, {"shape": shape, "pp": 2, "microbatches": pp_micro}),
        ONE_ACCUM: (LoomTrainer, 1, 1, {"shape": accum, "microbatches": ACCUMULATION}),
        DP_ACCUM: (LoomTrainer, 2, 1, {"shape": accum, "microbatches": ACCUMULATION // 2}),
        "probe": (Probe, 1, t, {"quick": opts.quick}),
    }
    log(f"layouts: global batch {shape.batch} (and {accum.batch} with accumulation)")
    hw = Hardware()
    fpt = flops_per_token(shape)
    with worker_groups(specs) as groups:
        probe, groups = groups["probe"], {k: g for k, g in groups.items() if k != "probe"}
        series = alternate(groups, opts.rounds, opts.steps, opts.warmup, probe, hw, log, opts.quiet_wait)
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


def section_zero(opts: BenchOptions, report: Report, log) -> None:
    shape = opts.shape
    log("zero: DP2, stages 0-3, per-rank bytes")
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


def section_data(opts: BenchOptions, report: Report, log) -> None:
    shape = opts.shape
    log(f"data: corpus {opts.corpus}")
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
    }


SECTIONS = {
    "peers": section_peers,
    "techniques": section_techniques,
    "layouts": section_layouts,
    "zero": section_zero,
    "data": section_data,
}
