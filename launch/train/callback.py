"""The `Callback` base: how optional work plugs into the training loop (OLMo-core's callback idea).

The trainer (`launch/train/trainer.py`) calls every callback, in list order, at three points:

    on_start(trainer)                 once, before the first step (after a resume: before the next step)
    on_step_end(trainer, metrics)     after every optimizer step; `metrics` holds train/loss,
                                      train/grad_norm, train/lr, time/step_s, … of that step
    on_stop(trainer, reason)          once, when the loop ends: "done", "signal", "time_limit",
                                      "nonfinite" or "save_failed"

A callback sees the trainer: its `state` (step, consumed tokens), `cfg`, `module` (the TrainModule:
`evaluate`, `technique_scalars`) and `loader`; it may call `trainer.request_stop(reason)`. Every
rank runs every callback on the same events, so a callback may issue collectives (an evaluation, a
checkpoint) as long as it does so on every rank — and may decide on rank 0 alone only what needs no
agreement (what to print, what to write to TensorBoard). Loom's own callbacks are in
`launch/train/callbacks.py`; a new one subclasses `Callback`, overrides what it needs and is appended to
the list `launch/train/run.py` builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom.launch.train.trainer import Trainer


class Callback:
    """Override any of the three hooks; each default does nothing."""

    def on_start(self, trainer: Trainer) -> None:
        """Before the first step of this process (also after a resume)."""

    def on_step_end(self, trainer: Trainer, metrics: dict) -> None:
        """After each optimizer step; `trainer.state.step` is already the new step number."""

    def on_stop(self, trainer: Trainer, reason: str) -> None:
        """When the loop ends, whatever the reason (see the module docstring)."""
