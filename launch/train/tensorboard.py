"""What a user watches: TensorBoard scalars (rank 0), a console line, a progress bar with ETA, and
the throughput arithmetic behind tokens/s, TFLOP/s and MFU."""

from __future__ import annotations

import math
import os
import time

import torch

from loom.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3× forward), Megatron-LM's accounting:
    2 FLOPs per weight per token in matmuls, plus the attention score/value products."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    per_layer = 2 * (d * (d + 2 * kv) + d * d + 3 * d * cfg.ffn_size) + 2 * 2 * seq_len * d / 2  # causal half
    return 3.0 * (L * per_layer + 2 * d * cfg.vocab_size)


def measure_peak_tflops(dtype: torch.dtype, device: torch.device, seconds: float = 0.5) -> float:
    """Achievable dense matmul TFLOP/s on this rank (the MFU denominator when none is configured)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    (a @ b).sum().item()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or iters < 3:
        c = a @ b
        iters += 1
    c.sum().item()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def memory_scalars(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "memory/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
            "memory/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    return {"memory/rss_gb": _process().memory_info().rss / 2**30}


def _process():
    import psutil

    return psutil.Process(os.getpid())


def system_scalars() -> dict[str, float]:
    """Leak detectors for long runs: open files, threads and child processes of this rank."""
    proc = _process()
    return {
        "system/open_fds": float(proc.num_fds()),
        "system/threads": float(proc.num_threads()),
        "system/child_processes": float(len(proc.children(recursive=True))),
    }


GRAD_NORM_EVERY_STEP = "train/grad_norm_every_step"
"""The global gradient norm of every optimizer step (the other train/ scalars come every `log_every` steps):
optimisation smoothness counts spikes against a 100-step running median, which one sample in ten would miss."""


class MetricsWriter:
    """Rank 0 writes; other ranks hold a no-op writer so call sites need no rank checks."""

    def __init__(self, log_dir: str | None, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value) and "loss" not in tag):
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, value: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """A tqdm bar with ETA on rank 0 when attached to a terminal (or when forced)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def update(self, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)

    @property
    def active(self) -> bool:
        return self.bar is not None

    def write(self, line: str) -> None:
        """Print above the bar without breaking it."""
        self.bar.write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
