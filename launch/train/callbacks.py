"""The trainer's callbacks: monitoring, held-out evaluation and checkpoints."""

from __future__ import annotations

import logging
import time
from collections import deque

import torch.distributed as dist

from loom.launch.checkpoint.errors import CheckpointError
from loom.launch.train.callback import Callback
from loom.launch.train.run_data import evaluate_sources
from loom.launch.train.tensorboard import (
    GRAD_NORM_EVERY_STEP,
    MetricsWriter,
    ProgressBar,
    memory_scalars,
    system_scalars,
)

log = logging.getLogger(__name__)

ETA_WINDOW_STEPS = 50  # the ETA follows the pace of the last this-many steps (evaluations and saves included)


def format_duration(seconds: float) -> str:
    """Compact h/m/s: `45s`, `12m05s`, `3h07m`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class MonitorCallback(Callback):
    """Scalars to TensorBoard every `log_every` steps, a console line (with elapsed time and an ETA),
    and a progress bar."""

    def __init__(
        self,
        writer: MetricsWriter,
        log_every: int,
        flops_per_step: float,
        peak_tflops: float,
        world_size: int,
        device,
        progress: bool,
    ):
        self.writer, self.log_every = writer, log_every
        self.flops_per_step, self.peak_tflops, self.world_size = flops_per_step, peak_tflops, world_size
        self.device, self.progress_enabled = device, progress
        self.bar: ProgressBar | None = None
        self._window: list[tuple[float, float]] = []
        self.clock = time.monotonic
        self._started = 0.0
        self._step_ends: deque[float] = deque(maxlen=ETA_WINDOW_STEPS + 1)

    def on_start(self, trainer) -> None:
        self.bar = ProgressBar(trainer.cfg.train.max_steps, trainer.state.step, self.progress_enabled)
        self._started = self.clock()
        self._step_ends.clear()
        self._step_ends.append(self._started)

    def _timing(self, step: int, max_steps: int) -> str:
        """`12m05s elapsed · ETA 24m10s`: wall time since this process started training, and the
        remaining steps at the mean wall time per step over the recent window."""
        now = self._step_ends[-1]
        text = f"{format_duration(now - self._started)} elapsed"
        if step < max_steps and len(self._step_ends) > 1:
            per_step = (now - self._step_ends[0]) / (len(self._step_ends) - 1)
            text += f" · ETA {format_duration(per_step * (max_steps - step))}"
        return text

    def on_step_end(self, trainer, metrics: dict) -> None:
        self._window.append((metrics["time/step_s"], metrics["time/data_wait_fraction"]))
        self._step_ends.append(self.clock())
        step = trainer.state.step
        self.writer.scalars({GRAD_NORM_EVERY_STEP: metrics["train/grad_norm"]}, step)  # flushed with the next log
        step_time = metrics["time/step_s"]
        tokens_per_s = trainer.tokens_per_step / step_time
        tflops = self.flops_per_step / step_time / self.world_size / 1e12
        if self.bar.active:
            self.bar.update(f"loss {metrics['train/loss']:.4f} · {tokens_per_s:,.0f} tok/s")
        if step % self.log_every and step != trainer.cfg.train.max_steps:
            return
        mean_time = sum(t for t, _ in self._window) / len(self._window)
        scalars = {k: v for k, v in metrics.items() if k.startswith(("train/", "time/"))}
        scalars.update(
            {
                "time/step_s": mean_time,
                "time/data_wait_fraction": sum(w for _, w in self._window) / len(self._window),
                "throughput/tokens_per_s": trainer.tokens_per_step / mean_time,
                "throughput/tflops_per_rank": self.flops_per_step / mean_time / self.world_size / 1e12,
                "throughput/mfu": self.flops_per_step / mean_time / self.world_size / 1e12 / self.peak_tflops,
                "data/epoch": getattr(trainer.loader, "epoch", 0),
                "data/corrupt_shards_skipped": getattr(trainer.loader, "corrupt_shards_skipped", 0),
            }
        )
        scalars.update(getattr(trainer.loader, "source_scalars", dict)())  # a mixture's data/<source>/...
        scalars.update(memory_scalars(self.device))
        scalars.update(system_scalars())
        scalars.update(trainer.module.technique_scalars())
        self._window.clear()
        self.writer.scalars(scalars, step)
        self.writer.flush()
        line = (
            f"step {step}/{trainer.cfg.train.max_steps} · loss {metrics['train/loss']:.4f} · "
            f"lr {metrics['train/lr']:.2e} · grad norm {metrics['train/grad_norm']:.3f} · "
            f"{scalars['throughput/tokens_per_s']:,.0f} tok/s · {tflops:.3f} TFLOP/s/rank · "
            f"MFU {scalars['throughput/mfu']:.1%} · {trainer.state.consumed_tokens:,} tokens · "
            f"{self._timing(step, trainer.cfg.train.max_steps)}"
        )
        if self.bar.active:
            self.bar.write(line)
        else:
            log.info(line)

    def on_stop(self, trainer, reason: str) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()


class EvalCallback(Callback):
    """Held-out loss and perplexity every `every` steps and at the end."""

    def __init__(self, make_batches, every: int, writer: MetricsWriter):
        self.make_batches, self.every, self.writer = make_batches, every, writer
        self.last: dict = {}
        self._evaluated_at = -1

    def _run(self, trainer) -> None:
        if self._evaluated_at == trainer.state.step:
            return
        self._evaluated_at = trainer.state.step
        start = time.perf_counter()
        batches = self.make_batches()  # several held-out sets come as {name: (weight, batches)}
        if isinstance(batches, dict):
            result = evaluate_sources(trainer.module, batches)
        else:
            result = trainer.module.evaluate(batches)
        if not result:
            return
        self.last = result
        self.writer.scalars(result, trainer.state.step)
        per_set = "".join(f" · {k[5:-5]} {v:.4f}" for k, v in result.items() if k.count("/") == 2 and "/loss" in k)
        log.info(
            f"eval at step {trainer.state.step}: loss {result['eval/loss']:.4f}{per_set} · "
            f"perplexity {result['eval/perplexity']:.2f} ({time.perf_counter() - start:.1f} s)"
        )

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self._run(trainer)

    def on_stop(self, trainer, reason: str) -> None:
        if reason == "done":
            self._run(trainer)


class CheckpointCallback(Callback):
    """Periodic checkpoints, and one when the run stops for any reason."""

    def __init__(self, every: int, save_fn, stop_on_error: bool = False):
        self.every, self.save_fn, self.stop_on_error = every, save_fn, stop_on_error
        self._saved_at = -1

    def save(self, trainer) -> bool:
        """True once this step's checkpoint is on disk (every rank agrees: saving is collective)."""
        if self._saved_at == trainer.state.step:
            return True
        start = time.perf_counter()
        try:
            folder = self.save_fn(trainer)
        except CheckpointError as exc:
            log.error(str(exc))
            if self.stop_on_error:
                trainer.request_stop("save_failed")
            return False
        self._saved_at = trainer.state.step
        if dist.get_rank() == 0:
            log.info(f"checkpoint saved: {folder} ({time.perf_counter() - start:.1f} s)")
        return True

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self.every and trainer.state.step % self.every == 0:
            self.save(trainer)

    def on_stop(self, trainer, reason: str) -> None:
        # whatever the policy, a run whose final checkpoint is missing did not finish cleanly: the
        # trainer turns a "done" into exit code 4 (a preempted run keeps 75: requeue resumes from the last good one)
        if not self.save(trainer):
            trainer.request_stop("save_failed")


class SampleCallback(Callback):
    """At the end of a completed run: a greedy continuation of a prompt, and the held-out loss set
    against the unigram baseline (how much the model learned beyond token frequencies)."""

    def __init__(
        self,
        prompt: str,
        tokenizer,
        max_new_tokens: int,
        dtype,
        device,
        baseline_fn=None,
        eval_callback: "EvalCallback | None" = None,
        writer: MetricsWriter | None = None,
    ):
        self.prompt, self.tokenizer, self.max_new_tokens = prompt, tokenizer, max_new_tokens
        self.dtype, self.device, self.baseline_fn = dtype, device, baseline_fn
        self.eval_callback, self.writer = eval_callback, writer

    def on_stop(self, trainer, reason: str) -> None:
        from loom.launch.train.sample import greedy_generate

        if reason != "done":
            return
        if self.prompt and getattr(trainer.module.module, "virtual_stages", 1) > 1:
            # the KV-cache decoder walks one chunk per rank; the checkpoint decodes at any layout
            log.info("sample skipped: decoding needs one model chunk per rank; run `loom generate` on the checkpoint")
        elif self.prompt:
            ids = self.tokenizer.encode(self.prompt)
            out = greedy_generate(trainer.module.module, ids, self.max_new_tokens, self.dtype, self.device)
            log.info(f"sample: {self.prompt!r} → {self.tokenizer.decode(out[len(ids) :])!r}")
        if (
            self.baseline_fn is not None
            and self.eval_callback is not None
            and self.eval_callback.last
            and dist.get_rank() == 0
        ):
            baseline = self.baseline_fn()
            loss = self.eval_callback.last["eval/loss"]
            if self.writer is not None:
                self.writer.scalars({"eval/unigram_baseline": baseline}, trainer.state.step)
            log.info(f"held-out loss {loss:.3f} nats/token vs unigram baseline {baseline:.3f} ({loss - baseline:+.3f})")
