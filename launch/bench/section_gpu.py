"""`loom bench` section `gpu` (`loom bench --device cuda`): Loom's training step against Hugging Face
Llama and each technique's overhead at a ~1B Llama shape on one GPU, with MFU against the H200's dense
bf16 peak and against a matmul probed in the same run, and peak memory.

One configuration at a time, each in a fresh process (`runner_gpu`), timed between device
synchronisations after warm-up steps. A GPU is not a shared two-core machine: step times are stable to
well under a percent, so configurations are measured once each instead of in alternating rounds. With
`--time-limit` configurations that would not fit are skipped (listed as such), in the order: probe,
Loom, HF, all five techniques, then each technique alone. `--dry-run` runs the same wiring on the CPU at
a tiny shape (the numbers then mean nothing).
"""

from __future__ import annotations

import logging
import statistics
import time

from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_rate, fmt_time, target_verdict
from loom.launch.bench.runner_gpu import run_isolated
from loom.launch.bench.workloads_gpu import (
    GPU_SHAPES,
    H200_BF16_DENSE_TFLOPS,
    bf16_attention_backward_works,
    flops_per_token,
    hf_step,
    loom_step,
    matmul_probe,
)
from loom.launch.runtime.fork import WorkerError

log = logging.getLogger(__name__)

TECHNIQUES = ("lcm", "scr", "cmr", "sca", "hcma")
TARGETS = {"mfu": 0.45, "loom/hf": 0.90, "technique": 1.03, "all five": 1.10}


def _configs() -> dict:
    """Name → (function, kwargs), in priority order under a time limit."""
    out = {"Loom (no technique)": (loom_step, {"techniques": ()}), "HF LlamaForCausalLM (sdpa)": (hf_step, {})}
    out["Loom, all five"] = (loom_step, {"techniques": TECHNIQUES})
    for name in TECHNIQUES:
        out[f"Loom, {name.upper()}"] = (loom_step, {"techniques": (name,)})
    return out


def header_options(dry: bool) -> dict:
    """BenchOptions for a `--device cuda` run: the report's header names this section's shape, and the
    timed and warm-up steps are this section's defaults (the CLI's --steps/--warmup override them)."""
    from loom.launch.bench.shapes import Shape

    g = GPU_SHAPES["dry" if dry else "1b"]
    shape = Shape(f"gpu-{g.name}", g.layers, g.hidden, g.heads, g.ffn, g.vocab, g.seq, g.micro_batch * g.microbatches)
    return {"shape": shape, "rounds": 1, "steps": 2 if dry else 5, "warmup": 1 if dry else 2}


def section_gpu(opts: BenchOptions, report: Report) -> None:
    dry = opts.dry_run
    device_type = "cpu" if dry else "cuda"
    shape = GPU_SHAPES["dry" if dry else "1b"]
    warmup, steps = opts.warmup, opts.steps
    # a dry run on a CPU without AVX-512 cannot train in bf16 (torch's CPU attention backward): fp32 there
    precision = "bf16" if not dry or bf16_attention_backward_works() else "fp32"
    started = time.monotonic()
    limit = opts.time_limit or float("inf")

    def left() -> float:
        return limit - (time.monotonic() - started)

    log.info(
        f"gpu: {shape.describe()} on {device_type}{' (dry run)' if dry else ''}, {precision}; time limit {limit:g} s"
    )
    probe, results, skipped, failed, estimate = None, {}, [], {}, 0.0
    try:
        probe = run_isolated(matmul_probe, device_type, timeout=min(120.0, max(left(), 1.0)))
    except WorkerError as exc:
        failed["matmul probe"] = str(exc).splitlines()[0]
    for name, (fn, kwargs) in _configs().items():
        if left() < 1.2 * estimate + 5:
            skipped.append(name)
            continue
        t0 = time.monotonic()
        try:
            results[name] = run_isolated(
                fn,
                device_type,
                timeout=max(10.0, left()),
                shape=shape,
                warmup=warmup,
                steps=steps,
                precision=precision,
                **kwargs,
            )
            log.info(f"  {name}: {statistics.median(results[name]['times']):.3f} s/step")
        except WorkerError as exc:
            failed[name] = str(exc).splitlines()[0]
            log.info(f"  {name}: failed: {failed[name]}")
        estimate = max(estimate, time.monotonic() - t0)
    _tables(report, shape, probe, results, skipped, failed, dry, precision)


def _flop(n: float) -> str:
    return f"{n / 1e9:.2f} GFLOP" if n >= 1e9 else f"{n / 1e6:.2f} MFLOP"


def _tables(
    report: Report, shape, probe, results: dict, skipped: list, failed: dict, dry: bool, precision: str
) -> None:
    fpt = flops_per_token(shape)
    probed = probe["flops"] if probe else None
    step = {name: statistics.median(r["times"]) for name, r in results.items()}
    base, hf = step.get("Loom (no technique)"), step.get("HF LlamaForCausalLM (sdpa)")
    timed = len(next(iter(results.values()))["times"]) if results else 0
    peaks = f"the H200's dense bf16 {H200_BF16_DENSE_TFLOPS:g} TFLOP/s"
    if probed:
        peaks += f", and the {probe['what']} measured in this run ({probed / 1e12:.1f} TFLOP/s)"
    report.add(
        "### GPU: Loom vs Hugging Face Llama, and the techniques' overhead" + (" (dry run on CPU)" if dry else ""),
        "",
        f"Shape: {shape.describe()}; {precision} (Loom: {precision} weights with DeepSpeed's fp32 masters, ZeRO-0, "
        f"one rank; HF: fp32 weights{' under bf16 autocast' if precision == 'bf16' else ''}, fused AdamW); no "
        "activation checkpointing. Step time: median of "
        f"{timed} steps between device synchronisations after warm-up. MFU = tokens/s × {_flop(fpt)}/token "
        f"(`flops_per_token`) / peak: {peaks}.",
        "",
    )
    rows = []
    for name, r in results.items():
        tps = shape.tokens_per_step / step[name]
        achieved = tps * fpt
        rows.append(
            [
                name,
                f"{r['params'] / 1e9:.3f} B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f} M",
                fmt_time(step[name]),
                fmt_rate(tps),
                f"{achieved / 1e12:.1f}",
                f"{achieved / (H200_BF16_DENSE_TFLOPS * 1e12) * 100:.1f}%",
                f"{achieved / probed * 100:.1f}%" if probed else "–",
                f"{r['peak_bytes'] / 2**30:.1f} GiB",
                f"{step[name] / base:.3f}" if base else "–",
            ]
        )
    for name, why in failed.items():
        rows.append([name, "–", f"failed: {why[:160]}", "", "", "", "", "", ""])
    for name in skipped:
        rows.append([name, "–", "skipped (time limit)", "", "", "", "", "", ""])
    report.table(
        [
            "configuration",
            "parameters",
            "step time",
            "tokens/s",
            "TFLOP/s",
            f"MFU ({H200_BF16_DENSE_TFLOPS:g} TF)",
            "MFU (probe)",
            "peak memory",
            "÷ Loom (no technique)",
        ],
        rows,
    )
    targets = []
    if base:
        mfu = shape.tokens_per_step / base * fpt / (H200_BF16_DENSE_TFLOPS * 1e12)
        targets.append(
            ["Loom MFU ≥ 45 % (dense bf16 peak)", target_verdict(mfu, TARGETS["mfu"], lower_is_better=False)]
        )
    if base and hf:
        targets.append(["Loom step ≤ 0.90× HF Llama (sdpa)", target_verdict(base / hf, TARGETS["loom/hf"])])
    for name in results:
        if name.startswith("Loom, ") and base:
            limit = TARGETS["all five"] if name == "Loom, all five" else TARGETS["technique"]
            targets.append(
                [f"{name.removeprefix('Loom, ')}: step ≤ {limit:.2f}× Loom", target_verdict(step[name] / base, limit)]
            )
    if targets:
        report.add("Targets (a verdict on a dry run means nothing):" if dry else "Targets:", "")
        report.table(["target", "verdict"], targets)
    report.results["gpu"] = {
        "shape": shape.name,
        "step_s": step,
        "peak_bytes": {n: r["peak_bytes"] for n, r in results.items()},
        "probe_flops": probed,
        "skipped": skipped,
        "failed": failed,
        "targets": dict(targets),
    }
