"""Capture the lines Loom logs (through `logging`), formatted as the console shows them."""

from __future__ import annotations

import contextlib
import logging

from loom.launch.runtime.logs import RankFormatter


@contextlib.contextmanager
def captured_lines(level: int = logging.INFO):
    """The `loom` loggers' lines inside the block, e.g. `warning: …`, `error: …`, plain info lines."""
    lines: list[str] = []
    formatter = RankFormatter()

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record))

    logger = logging.getLogger("loom")
    handler, previous = ListHandler(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
