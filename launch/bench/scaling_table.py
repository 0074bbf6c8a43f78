"""The scaling section's extrapolation: `scaling_model` evaluated for the stated models, GPU counts,
ZeRO stages and overlap, as report rows, and the findings read off those numbers (nothing hard-coded)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.launch.bench.scaling_model import (
    GPT_1B,
    GPT_7B,
    SEQUENCES_PER_GPU,
    Cluster,
    Step,
    efficiency,
    state_bytes,
    step_time,
    tokens_per_gpu,
)

GPU_COUNTS = (8, 16, 64, 256, 1024)
"""The first is the reference of the scaling efficiency (one node: NVLink only)."""
MODELS = (GPT_1B, GPT_7B)
CONFIGS = ((1, False), (1, True), (3, False), (3, True))
"""(ZeRO stage, overlap): the table's columns, in order."""


def config_name(stage: int, overlap: bool) -> str:
    return f"ZeRO-{stage}, {'overlap' if overlap else 'no overlap'}"


@dataclass(frozen=True)
class Cell:
    step: Step
    tokens_per_gpu: float
    efficiency: float


def scaling_grid(
    cluster: Cluster = Cluster(),
    models: tuple = MODELS,
    gpu_counts: tuple = GPU_COUNTS,
    sequences_per_gpu: int = SEQUENCES_PER_GPU,
) -> dict:
    """{(model name, N, stage, overlap): Cell}, efficiency against the first of `gpu_counts`."""
    grid = {}
    for model in models:
        for stage, overlap in CONFIGS:
            steps = {n: step_time(model, n, stage, overlap, cluster, sequences_per_gpu) for n in gpu_counts}
            reference = steps[gpu_counts[0]]
            for n, step in steps.items():
                grid[model.name, n, stage, overlap] = Cell(
                    step, tokens_per_gpu(step, model, sequences_per_gpu), efficiency(step, reference)
                )
    return grid


def scaling_rows(grid: dict, models: tuple = MODELS, gpu_counts: tuple = GPU_COUNTS) -> list[list[str]]:
    """One row per model and N: compute and communication per step, tokens/s per GPU (efficiency) of
    every configuration, and the model state per GPU under ZeRO-1 and ZeRO-3."""
    rows = []
    for model in models:
        for n in gpu_counts:
            cells = [grid[model.name, n, stage, overlap] for stage, overlap in CONFIGS]
            zero1, zero3 = grid[model.name, n, 1, False].step, grid[model.name, n, 3, False].step
            rows.append(
                [
                    model.name,
                    f"{n:,}",
                    f"{zero1.compute * 1e3:.0f} ms",
                    f"{zero1.comm * 1e3:.0f} / {zero3.comm * 1e3:.0f} ms",
                    *(f"{c.tokens_per_gpu:,.0f} ({c.efficiency:.0%})" for c in cells),
                    f"{_gb(state_bytes(1, model.params, n))} / {_gb(state_bytes(3, model.params, n))} GB",
                ]
            )
    return rows


SCALING_HEADER = [
    "model",
    "GPUs",
    "compute / step",
    "comm / step, ZeRO-1 / ZeRO-3",
    *(f"{config_name(stage, overlap)}: tokens/s/GPU (eff.)" for stage, overlap in CONFIGS),
    "model state / GPU, ZeRO-1 / ZeRO-3",
]


def _gb(nbytes: float) -> str:
    """Gigabytes to two significant digits below 10 (ZeRO-3's partitions shrink to megabytes)."""
    gb = nbytes / 1e9
    return f"{gb:.0f}" if gb >= 10 else f"{gb:.2g}"


def _gain(slow: Cell, fast: Cell) -> float:
    """How much more tokens/s `fast` gives than `slow`, as a fraction of `slow`'s."""
    return fast.tokens_per_gpu / slow.tokens_per_gpu - 1


def scaling_findings(grid: dict, models: tuple = MODELS, gpu_counts: tuple = GPU_COUNTS) -> list[str]:
    """Where overlap and the ZeRO stage change the outcome, read off `grid`: one paragraph per model."""
    first, top = gpu_counts[0], gpu_counts[-1]
    lines = []
    for model in models:
        cell = lambda n, stage, overlap: grid[model.name, n, stage, overlap]
        drop, a, b = max(
            (cell(a, 1, False).efficiency - cell(b, 1, False).efficiency, a, b)
            for a, b in zip(gpu_counts, gpu_counts[1:])
        )
        backlogged = [(n, stage) for n in gpu_counts for stage in (1, 3) if cell(n, stage, True).step.backlog > 0]
        if backlogged:
            n, stage = backlogged[0]
            where = f"At {top:,} GPUs" if n == top else f"From {n:,} GPUs on"
            hiding = (
                f"{where} ZeRO-{stage}'s communication outgrows the compute that could hide it (backlog "
                f"{cell(top, stage, True).step.backlog * 1e3:.1f} ms at {top:,} GPUs). "
            )
        else:
            exposed = cell(top, 1, True).step
            hiding = (
                f"The compute hides all communication but the last bucket at every N up to {top:,} (at {top:,} "
                f"GPUs {exposed.exposed * 1e3:.1f} ms of ZeRO-1's {exposed.comm * 1e3:.0f} ms stay exposed). "
            )
        lines.append(
            f"**{model.name}** ({model.params / 1e9:.2f} B parameters): without overlap the efficiency at "
            f"{top:,} GPUs is {cell(top, 1, False).efficiency:.0%} (ZeRO-1) and {cell(top, 3, False).efficiency:.0%} "
            f"(ZeRO-3); the largest single drop is {a:,} → {b:,} GPUs ({drop * 100:.0f} points, ZeRO-1)"
            + (", where the all-reduce leaves NVLink for InfiniBand. " if a == first else ". ")
            + f"With overlap it is {cell(top, 1, True).efficiency:.0%} / {cell(top, 3, True).efficiency:.0%}: "
            f"overlap gives {_gain(cell(top, 1, False), cell(top, 1, True)):.0%} (ZeRO-1) and "
            f"{_gain(cell(top, 3, False), cell(top, 3, True)):.0%} (ZeRO-3) more tokens/s at {top:,} GPUs. "
            + hiding
            + f"ZeRO-3 instead of ZeRO-1 costs {-_gain(cell(top, 1, False), cell(top, 3, False)):.0%} of the "
            f"tokens/s at {top:,} GPUs without overlap and {-_gain(cell(top, 1, True), cell(top, 3, True)):.1%} "
            f"with it, for {_gb(state_bytes(3, model.params, first))} instead of "
            f"{_gb(state_bytes(1, model.params, first))} GB of model state per GPU at {first:,} GPUs."
        )
    return lines
