"""Logging for every Loom process: one rank-aware set-up instead of `log=` callables.

Library code logs through `logging.getLogger(__name__)`; a command calls `setup_logging()` once. Rank 0
prints INFO and above to stdout as plain lines (warnings start with `warning:`), so a single-process
command and rank 0 of a job read like a console program. Other ranks print only errors, prefixed with
their rank: the ranks of a job agree on everything rank 0 reports, so repeating it N times is noise.
"""

from __future__ import annotations

import logging
import os
import sys

_LEVEL_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


def current_rank() -> int:
    """This process's global rank: from the process group once it exists, else from the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class RankFormatter(logging.Formatter):
    """`warning: …` / `error: …` prefixes as the CLI has always printed them; `[rank N]` off rank 0."""

    def format(self, record: logging.LogRecord) -> str:
        text = _LEVEL_PREFIX.get(record.levelno, "") + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        rank = current_rank()
        return f"[rank {rank}] {text}" if rank else text


class _RankFilter(logging.Filter):
    """Rank 0 passes everything at the handler's level; other ranks only errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return current_rank() == 0 or record.levelno >= logging.ERROR


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout`/`sys.stderr` are at the time (pytest and tools swap them)."""

    def __init__(self, stream_name: str):
        super().__init__(getattr(sys, stream_name))
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.stream_name)
        super().emit(record)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def setup_logging(level: int = logging.INFO) -> None:
    """Route the `loom` loggers to stdout (below ERROR) and stderr (ERROR and above). Idempotent."""
    logger = logging.getLogger("loom")
    for handler in list(logger.handlers):
        if getattr(handler, "_loom", False):
            logger.removeHandler(handler)
    out = _ConsoleHandler("stdout")
    out.addFilter(_BelowError())
    err = _ConsoleHandler("stderr")
    err.setLevel(logging.ERROR)
    for handler in (out, err):
        handler._loom = True  # type: ignore[attr-defined]
        handler.setFormatter(RankFormatter())
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def progress_to_stderr(name: str, quiet: bool = False) -> None:
    """Send logger `name`'s records to stderr alone (a command whose stdout is its result, like `loom
    bench`'s report); `quiet` keeps only warnings and errors."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if getattr(handler, "_loom", False):
            logger.removeHandler(handler)
    handler = _ConsoleHandler("stderr")
    handler._loom = True  # type: ignore[attr-defined]
    handler.setFormatter(RankFormatter())
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def flush_logs() -> None:
    for handler in logging.getLogger("loom").handlers:
        handler.flush()
