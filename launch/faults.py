"""Fault injection for the reliability tests, switched on by environment variables only, so no
run configuration can carry it by accident.

LOOM_FAULT_NAN_STEPS=3,4      the first stage's embedding output becomes NaN at these steps
"""
from __future__ import annotations

import contextlib
import os


def _steps(name: str) -> set[int]:
    raw = os.environ.get(name, "")
    return {int(s) for s in raw.split(",") if s.strip()}


@contextlib.contextmanager
def nan_injection(module, step: int):
    if step not in _steps("LOOM_FAULT_NAN_STEPS") or not getattr(module, "is_first", False):
        yield
        return
    handle = module.embedding.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        yield
    finally:
        handle.remove()
