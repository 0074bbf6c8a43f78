"""The training loop: micro-batches → train step → callbacks, until done or told to stop.

Everything optional (logging, evaluation, checkpoints) is a callback. Stop requests — SIGTERM or
SIGUSR1 from Slurm, the `train.max_minutes` limit, too many non-finite steps — are agreed on by
all ranks at a step boundary, so every rank saves the same checkpoint and exits together.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass

from loom.launch.runtime.faults import maybe_kill, maybe_raise
from loom.launch.train.callback import Callback
from loom.launch.train.lr_schedule import learning_rate
from loom.model.parallel import comm

log = logging.getLogger(__name__)

EXIT_DONE = 0
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped with a checkpoint; the job script requeues on this code


@dataclass
class TrainState:
    step: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class StopSignals:
    """Remembers SIGTERM/SIGUSR1 (Slurm preemption or time limit) until the next step boundary."""

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg, module, loader, state: TrainState, callbacks: list[Callback], tokens_per_step: int):
        self.cfg, self.module, self.loader, self.state = cfg, module, loader, state
        self.callbacks, self.tokens_per_step = callbacks, tokens_per_step
        self.signals = StopSignals()
        self.started = time.monotonic()
        self._requested: str | None = None

    def request_stop(self, reason: str) -> None:
        """A callback's request; every rank's callbacks see the same events, so they agree."""
        self._requested = reason

    def _lr(self, step: int) -> float:
        o = self.cfg.optim
        return learning_rate(
            step,
            lr=o.lr,
            min_lr=o.min_lr,
            warmup_steps=o.warmup_steps,
            max_steps=self.cfg.train.max_steps,
            schedule=o.schedule,
        )

    def fit(self) -> int:
        for cb in self.callbacks:
            cb.on_start(self)
        reason = "done"
        microbatches = self.cfg.parallel.microbatches
        while self.state.step < self.cfg.train.max_steps:
            t0 = time.perf_counter()
            batches = [next(self.loader) for _ in range(microbatches)]
            t_data = time.perf_counter() - t0
            metrics = self.module.train_batch(batches, self.state.step, self._lr(self.state.step))
            step_time = time.perf_counter() - t0
            self._account(metrics)
            metrics.update({"time/step_s": step_time, "time/data_wait_fraction": t_data / max(step_time, 1e-9)})
            maybe_kill(self.state.step, "step")
            maybe_raise(self.state.step)
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            reason = self._stop_reason()
            if reason:
                break
        reason = reason or "done"
        for cb in self.callbacks:
            cb.on_stop(self, reason)
        if reason == "done" and self._requested == "save_failed":
            reason = "save_failed"  # all steps ran, but the final checkpoint could not be written
        return {"done": EXIT_DONE, "nonfinite": EXIT_NONFINITE, "save_failed": EXIT_SAVE_FAILED}.get(
            reason, EXIT_REQUEUE
        )

    def _account(self, metrics: dict) -> None:
        s = self.state
        s.step += 1
        s.consumed_tokens += self.tokens_per_step
        if metrics["finite"]:
            s.consecutive_nonfinite = 0
        else:
            s.skipped_steps += 1
            s.consecutive_nonfinite += 1
            log.warning(
                f"step {s.step}: non-finite loss or gradient norm "
                f"(loss {metrics['train/loss']}, grad norm {metrics['train/grad_norm']}); step skipped"
            )
        metrics.update({"train/consumed_tokens": s.consumed_tokens, "train/skipped_steps": s.skipped_steps})

    def _stop_reason(self) -> str | None:
        if self._requested:
            return self._requested
        limit = self.cfg.train.max_minutes
        flags = comm.all_reduce_values(
            [
                1.0 if self.signals.received else 0.0,
                1.0 if limit > 0 and time.monotonic() - self.started > limit * 60 else 0.0,
                1.0 if self.state.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite else 0.0,
            ],
            op=comm.ReduceOp.MAX,
        )
        if flags[0]:
            return "signal"
        if flags[1]:
            return "time_limit"
        if flags[2]:
            return "nonfinite"
        return None
