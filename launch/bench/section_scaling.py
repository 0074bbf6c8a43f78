"""`loom bench` section `scaling`: the compute and communication of a data-parallel step measured on this
machine (one rank's compute, a gloo all-reduce of the gradients, the DP2 step), set beside the analytic
model's prediction for this machine, then the model extrapolated to 8-1,024 GPUs of a stated H100 cluster
for a 1B and a 7B GPT (`scaling_model`, `scaling_table`)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

from loom.launch.bench.alternate import alternate
from loom.launch.bench.hardware import Hardware, Probe
from loom.launch.bench.loom_workload import LoomTrainer
from loom.launch.bench.options import BenchOptions
from loom.launch.bench.report import Report, fmt_bytes, fmt_time
from loom.launch.bench.scaling_model import (
    ACHIEVED_MFU,
    BACKWARD_SHARE,
    BUCKET_BYTES,
    GPT_1B,
    GPT_7B,
    H100_BF16_DENSE_FLOPS,
    INFINIBAND,
    NVLINK,
    SEQUENCES_PER_GPU,
    Cluster,
    MachinePoint,
)
from loom.launch.bench.scaling_table import SCALING_HEADER, scaling_findings, scaling_grid, scaling_rows
from loom.launch.bench.shapes import flops_per_token
from loom.launch.bench.workers import worker_groups
from loom.launch.bench.workloads import Workload

log = logging.getLogger(__name__)

ONE_RANK = "one rank's compute"
DP2 = "DP2 (ZeRO-0)"
ALL_REDUCE = "gloo all-reduce"


class GradientAllReduce(Workload):
    """A gloo all-reduce of a tensor the size of a step's fp32 gradients (`measure`), and of one element
    (`latency`): the two points the model's link is fitted to."""

    def __init__(self, rank: int, world: int, elements: int):
        import torch

        self.grads = torch.zeros(elements)  # zeros stay finite however often they are summed
        self.one = torch.zeros(1)

    def step(self) -> None:
        from loom.model.parallel import comm

        comm.all_reduce(self.grads)

    def latency(self, repeats: int = 50) -> float:
        from loom.model.parallel import comm

        comm.barrier()  # both ranks start together, so the first call does not time the other's arrival
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            comm.all_reduce(self.one)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def _measure(opts: BenchOptions) -> tuple[MachinePoint, float, float]:
    """This machine at DP=2: the point, the tokens of one rank's share, and the probed 1-thread peak."""
    shape = opts.shape
    share = dataclasses.replace(shape, batch=shape.batch // 2)  # what each DP2 rank computes
    specs = {
        ONE_RANK: (LoomTrainer, 1, 1, {"shape": share}),
        DP2: (LoomTrainer, 2, 1, {"shape": shape}),
        "probe": (Probe, 1, 1, {"quick": opts.quick}),
    }
    hw = Hardware()
    with worker_groups(specs) as groups:
        elements = groups[ONE_RANK].call("param_count")[0]
        with worker_groups({ALL_REDUCE: (GradientAllReduce, 2, 1, {"elements": elements})}) as comm:
            timed = {ONE_RANK: groups[ONE_RANK], DP2: groups[DP2], ALL_REDUCE: comm[ALL_REDUCE]}
            series = alternate(timed, opts.rounds, opts.steps, opts.warmup, groups["probe"], hw, opts.quiet_wait)
            latency = max(comm[ALL_REDUCE].call("latency"))
    point = MachinePoint(
        compute=series[ONE_RANK].median,
        all_reduce=series[ALL_REDUCE].median,
        latency=latency,
        grad_bytes=4 * elements,  # the CPU runs train in fp32
        measured_step=series[DP2].median,
    )
    return point, share.tokens_per_step, hw.peak_flops


def section_scaling(opts: BenchOptions, report: Report) -> None:
    shape = opts.shape
    log.info("scaling: one rank's compute, gloo all-reduce and DP2 step, then the model at 8-1,024 GPUs")
    point, share_tokens, peak = _measure(opts)
    achieved = share_tokens * flops_per_token(shape) / point.compute
    comm_in_step = point.measured_step - point.compute
    report.add(
        "### Scaling: data-parallel step time measured here, extrapolated to GPU clusters",
        "",
        f"Measured on this machine, alternating in {opts.rounds} rounds: one process × 1 thread training one "
        f"DP rank's share of the batch ({shape.batch // 2} × {shape.seq}), a gloo all-reduce between 2 ranks "
        f"of a tensor the size of the model's fp32 gradients, and Loom's DP2 step (ZeRO-0, 1 thread per rank, "
        f"batch {shape.batch} × {shape.seq}). The model's link for this machine is fitted to the all-reduce: "
        "latency per ring step from a one-element all-reduce, bandwidth from the rest.",
        "",
    )
    report.table(
        ["quantity", "measured", "model"],
        [
            [f"one rank's compute (1 process, batch {shape.batch // 2})", fmt_time(point.compute), "input"],
            [
                f"gloo all-reduce of {fmt_bytes(point.grad_bytes)} of gradients, 2 ranks",
                fmt_time(point.all_reduce),
                f"fitted: {point.link.bandwidth / 1e9:.2f} GB/s, {point.link.latency * 1e6:.0f} µs per ring step",
            ],
            [
                f"DP2 step (ZeRO-0, batch {shape.batch})",
                fmt_time(point.measured_step),
                f"compute + all-reduce = {fmt_time(point.predicted_step)} "
                f"(measured / model {point.measured_step / point.predicted_step:.2f})",
            ],
            ["DP2 step − one rank's compute", fmt_time(comm_in_step), f"all-reduce {fmt_time(point.all_reduce)}"],
            [
                "achieved FLOP/s in one rank's compute",
                f"{achieved / 1e9:.1f} GFLOP/s ({achieved / peak:.0%} of the probed 1-thread matmul)",
                f"GPU cluster below: {H100_BF16_DENSE_FLOPS * ACHIEVED_MFU / 1e12:.0f} TFLOP/s "
                f"({ACHIEVED_MFU:.0%} of {H100_BF16_DENSE_FLOPS / 1e12:.0f})",
            ],
        ],
    )
    unexplained = point.measured_step - point.predicted_step
    if unexplained > 0:
        fit = (
            f"Compute + all-reduce account for {point.predicted_step / point.measured_step:.0%} of the measured "
            f"DP2 step; the other {fmt_time(unexplained)} are what the model leaves out (DeepSpeed's gradient "
            "copies around the all-reduce, the two ranks sharing one memory bus). The extrapolation below has "
            "no such term either, so its efficiencies are on the optimistic side."
        )
    else:
        fit = (
            f"The model predicts {fmt_time(-unexplained)} more than the measured DP2 step "
            f"({point.predicted_step / point.measured_step:.0%} of it)."
        )
    report.add(fit, "")
    grid = scaling_grid()
    report.add(
        f"Extrapolated with `launch/bench/scaling_model.py` to {Cluster().name}: "
        f"NVLink {NVLINK.bandwidth / 1e9:.0f} GB/s per GPU and {NVLINK.latency * 1e6:.0f} µs per ring step "
        f"inside a node of 8, InfiniBand {INFINIBAND.bandwidth / 1e9:.0f} GB/s per GPU and "
        f"{INFINIBAND.latency * 1e6:.0f} µs between nodes; hierarchical ring all-reduce (reduce-scatter in "
        "the node, all-reduce of each GPU's 1/8 across nodes, all-gather in the node), latency paid once per "
        f"collective. Per-GPU batch {SEQUENCES_PER_GPU} × {GPT_1B.seq} tokens (weak scaling); compute = "
        "tokens × (6P + causal attention) / achieved FLOP/s. bf16 gradients: ZeRO-1 all-reduces 2P bytes during "
        "the backward; ZeRO-3 gathers parameters for the forward and the backward and reduce-scatters gradients "
        f"(1.5× the volume). Overlap hides the backward's collectives behind the backward ({BACKWARD_SHARE:.0%} "
        "of compute) and ZeRO-3's forward gathers behind the forward, down to the last "
        f"{BUCKET_BYTES / 1e6:.0f} MB bucket (or the first layer's gather). Efficiency = tokens/s per GPU "
        f"against 8 GPUs of the same configuration. Shapes: {GPT_1B.name} d {GPT_1B.hidden}, {GPT_1B.layers} "
        f"layers; {GPT_7B.name} d {GPT_7B.hidden}, {GPT_7B.layers} layers; vocab {GPT_1B.vocab}, "
        "P = 12·L·d² + V·d. Model state = mixed-precision Adam (16P bytes, ZeRO-partitioned), no activations.",
        "",
    )
    report.table(SCALING_HEADER, scaling_rows(grid))
    findings = scaling_findings(grid)
    for line in findings:
        report.add(line, "")
    report.results["scaling"] = {
        "machine": point,
        "comm_in_step": comm_in_step,
        "achieved_flops": achieved,
        "grid": grid,
        "findings": findings,
    }
