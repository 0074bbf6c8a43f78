"""Fault injection for the reliability tests, switched on by environment variables only, so no
run configuration can carry it by accident.

LOOM_FAULT_NAN_STEPS=3,4        the first stage's embedding output becomes NaN at these steps
LOOM_FAULT_KILL=RANK:STEP:PHASE  global rank RANK kills itself with SIGKILL at STEP, either right
                                 after that step's optimizer update (PHASE "step") or in the middle
                                 of writing that step's checkpoint (PHASE "save": engine files
                                 written, manifest not yet)
LOOM_FAULT_RAISE=STEP            every rank raises RuntimeError after STEP's optimizer update (an
                                 ordinary bug: the run must exit with its traceback, not hang)
"""

from __future__ import annotations

import contextlib
import os
import signal


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


def maybe_kill(step: int, phase: str) -> None:
    spec = os.environ.get("LOOM_FAULT_KILL")
    if not spec:
        return
    rank, at_step, at_phase = spec.split(":")
    if int(rank) == int(os.environ.get("RANK", "0")) and int(at_step) == step and at_phase == phase:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_raise(step: int) -> None:
    if os.environ.get("LOOM_FAULT_RAISE") and int(os.environ["LOOM_FAULT_RAISE"]) == step:
        raise RuntimeError(f"LOOM_FAULT_RAISE: injected error after step {step}")
