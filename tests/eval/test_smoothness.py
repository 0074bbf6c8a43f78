"""Optimisation smoothness (docs/techniques.md, LCM metrics: grad-norm CV over 100-step windows and spikes
above 3x the running median) reads every step's gradient norm, not the one-in-`log_every` console scalars."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from loom.launch.eval.aggregate import _run_log_metrics, read_run_logs
from loom.launch.train.callbacks import MonitorCallback
from loom.launch.train.tensorboard import MetricsWriter

STEPS, LOG_EVERY, SPIKE_AT = 300, 10, 155  # the spike falls between two logged steps


def _train_with_a_spike(run_dir) -> None:
    """MonitorCallback as `loom train` drives it, with a real TensorBoard writer."""
    writer = MetricsWriter(str(run_dir / "tensorboard"), enabled=True)
    monitor = MonitorCallback(
        writer, LOG_EVERY, flops_per_step=1e9, peak_tflops=1.0, world_size=1, device=torch.device("cpu"), progress=False
    )
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(max_steps=STEPS)),
        state=SimpleNamespace(step=0, consumed_tokens=0),
        tokens_per_step=512,
        loader=SimpleNamespace(),
        module=SimpleNamespace(technique_scalars=dict),
    )
    monitor.on_start(trainer)
    noise = np.random.default_rng(0).uniform(0.9, 1.1, STEPS + 1)
    for step in range(1, STEPS + 1):
        trainer.state.step = step
        norm = 10.0 if step == SPIKE_AT else float(noise[step])
        metrics = {
            "train/loss": 5.0,
            "train/lr": 1e-3,
            "train/grad_norm": norm,
            "time/step_s": 0.1,
            "time/data_wait_fraction": 0.0,
        }
        monitor.on_step_end(trainer, metrics)
    monitor.on_stop(trainer, "done")
    writer.close()


def _smoothness(run_logs: dict) -> tuple[dict, list]:
    ev = SimpleNamespace(s=SimpleNamespace(smooth_window=100), notes=[])
    out: dict = {}
    _run_log_metrics(run_logs, ev, {"smoothness"}, out)
    return out, ev.notes


def test_a_spike_between_logged_steps_is_counted(tmp_path):
    _train_with_a_spike(tmp_path)
    logs = read_run_logs(tmp_path)
    assert len(logs["train/grad_norm"]) == STEPS // LOG_EVERY  # the console scalars stay one in ten
    out, notes = _smoothness(logs)
    assert out["smoothness/grad_norm_spikes"] == 1.0
    assert out["smoothness/logged_steps"] == STEPS and not notes
    every = [logs["train/grad_norm_every_step"][s] for s in range(1, STEPS + 1)]
    assert out["smoothness/grad_norm_cv"] > 0 and every[SPIKE_AT - 1] == 10.0


def test_a_run_without_the_every_step_series_says_so(tmp_path):
    _train_with_a_spike(tmp_path)
    logs = read_run_logs(tmp_path)
    logs.pop("train/grad_norm_every_step")  # a run trained before the series existed
    out, notes = _smoothness(logs)
    assert out["smoothness/logged_steps"] == STEPS // LOG_EVERY and out["smoothness/grad_norm_spikes"] == 0.0
    assert len(notes) == 1 and "spikes between logged steps are missed" in notes[0]
    out, notes = _smoothness({})
    assert "smoothness/grad_norm_cv" not in out and "no train/grad_norm_every_step" in notes[0]
