"""Alternating rounds over worker groups, and the paired ratios that make a noisy machine usable:
a slow spell that hits one round hits both sides of that round's ratio."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

from loom.launch.bench.hardware import QUIET_CORES, CpuMeter, Hardware
from loom.launch.runtime.fork import WorkerGroup

log = logging.getLogger(__name__)


@dataclass
class Series:
    """Step times of one configuration: per round, the step times of its slowest rank, and how
    many of the cores it uses the rest of the machine took meanwhile."""

    rounds: list[list[float]] = field(default_factory=list)
    external: list[float] = field(default_factory=list)

    @property
    def all(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def median(self) -> float:
        return statistics.median(self.all)

    @property
    def best(self) -> float:
        return min(self.all)

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds]


def paired_ratio(a: Series, b: Series) -> float:
    """Median over rounds of (a's round median / b's round median)."""
    return statistics.median(x / y for x, y in zip(a.round_medians(), b.round_medians()))


def quiet_paired_ratio(a: Series, b: Series, minimum: int = 3) -> tuple[float | None, int]:
    """`paired_ratio` over the rounds in which neither side shared the machine (None if too few)."""
    pairs = [
        (x, y)
        for x, y, ea, eb in zip(a.round_medians(), b.round_medians(), a.external, b.external)
        if ea < QUIET_CORES and eb < QUIET_CORES
    ]
    if len(pairs) < minimum:
        return None, len(pairs)
    return statistics.median(x / y for x, y in pairs), len(pairs)


LOAD: list[float] = []  # cores the rest of the machine used, per measured configuration and round


def alternate(
    groups: dict[str, WorkerGroup],
    rounds: int,
    steps: int,
    warmup: int,
    probe: WorkerGroup | None,
    hardware: Hardware,
    quiet_wait: float = 0.0,
) -> dict[str, Series]:
    """Warm every group up, then `rounds` rounds; each round runs every group for `steps` steps in
    a rotated order, with a hardware probe first. With `quiet_wait` > 0 a round may spend up to
    that many seconds waiting for the rest of the machine to go idle, before it starts and before
    redoing a measurement that shared the machine."""
    meter = CpuMeter()
    names = list(groups)
    for name in names:
        if warmup:
            groups[name].call("measure", steps=warmup)
    out = {name: Series() for name in names}
    for r in range(rounds):
        deadline = time.monotonic() + quiet_wait
        if quiet_wait > 0:
            meter.wait_for_quiet(quiet_wait)
        if probe is not None:
            result = probe.call("measure")[0]
            hardware.flops.append(result["flops"])
            hardware.bandwidth.append(result["bandwidth"])
            hardware.labels = (result["matmul"], result["copy"])
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            # others running on cores this configuration leaves idle do not disturb it
            spare = max(0, meter.cpus - groups[name].world * groups[name].threads)
            while True:  # with quiet_wait, a measurement disturbed by others is redone until the deadline
                token = meter.start(p.pid for p in groups[name].procs)
                per_rank = groups[name].call("measure", steps=steps)
                external = max(0.0, meter.stop(token) - spare)
                if not external >= QUIET_CORES or time.monotonic() >= deadline:
                    break
                meter.wait_for_quiet(max(0.0, deadline - time.monotonic()))
            out[name].external.append(external)
            out[name].rounds.append([max(ts) for ts in zip(*per_rank)])
        LOAD.extend(out[n].external[-1] for n in names)
        log.info(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(
                f"{n} {statistics.median(out[n].rounds[-1]):.3f}s (others on its cores {out[n].external[-1]:.1f})"
                for n in names
            )
        )
    return out
