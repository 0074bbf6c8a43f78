"""This machine's limits, probed in the same run as the workloads: matmul FLOP/s, copy bandwidth,
and how much CPU the rest of the machine takes meanwhile."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field


def matmul_flops(n: int = 2048, seconds: float = 0.4, dtype=None, device=None) -> float:
    """Dense n×n matmul FLOP/s on this process's threads (fp32 on CPU, bf16 on GPU)."""
    import torch

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = a @ b
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=c)
        iters += 1
        if iters >= 3:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2.0 * n**3 * iters / (time.perf_counter() - start)


def copy_bandwidth(mbytes: int = 256, seconds: float = 0.4, device=None) -> float:
    """Bytes/s moved by `dst.copy_(src)` of a large fp32 tensor (read + write counted)."""
    import torch

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    n = mbytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        dst.copy_(src)
        iters += 1
        if iters >= 3:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2.0 * n * 4 * iters / (time.perf_counter() - start)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """The hardware ceiling, measured in its own worker with the benchmark's thread count."""

    def __init__(self, rank: int, world: int, quick: bool = False):
        self.seconds = 0.15 if quick else 0.4
        self.n = 1024 if quick else 2048
        self.mbytes = 64 if quick else 256

    def measure(self) -> dict:
        import torch

        return {
            "flops": matmul_flops(self.n, self.seconds),
            "bandwidth": copy_bandwidth(self.mbytes, self.seconds),
            "matmul": f"{'bf16' if torch.cuda.is_available() else 'fp32'} matmul ({self.n}²)",
            "copy": f"tensor copy ({self.mbytes} MiB, read + write)",
        }


QUIET_CORES = 0.25  # a measurement is "quiet" when the rest of the machine used less than this


class CpuMeter:
    """CPU time the rest of the machine used while our workers ran, in cores (Linux /proc; the
    machine-wide busy time minus our processes' own)."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.available = os.path.exists("/proc/stat")

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait

    @staticmethod
    def _ours(pids) -> int:
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                total += int(rest[11]) + int(rest[12])  # utime, stime (all threads)
            except (OSError, IndexError, ValueError):
                pass
        return total

    def start(self, pids) -> tuple:
        pids = list(pids) + [os.getpid()]
        return (pids, self._busy(), self._ours(pids), time.perf_counter()) if self.available else None

    def stop(self, token) -> float:
        if token is None:
            return float("nan")
        pids, busy, ours, t0 = token
        seconds = max(time.perf_counter() - t0, 1e-6)
        other = (self._busy() - busy) - (self._ours(pids) - ours)
        return max(0.0, other / self.hz / seconds)

    def wait_for_quiet(self, max_wait: float) -> float:
        """Sleep (in 1 s samples) until the rest of the machine is idle or `max_wait` has passed;
        returns the last sample's busy cores."""
        deadline, busy = time.monotonic() + max_wait, float("nan")
        while self.available:
            token = self.start([])
            time.sleep(1.0)
            busy = self.stop(token)
            if busy < QUIET_CORES or time.monotonic() >= deadline:
                break
        return busy


@dataclass
class Hardware:
    flops: list[float] = field(default_factory=list)
    bandwidth: list[float] = field(default_factory=list)
    labels: tuple = ("matmul", "tensor copy (read + write)")

    @property
    def peak_flops(self) -> float:
        return statistics.median(self.flops)
