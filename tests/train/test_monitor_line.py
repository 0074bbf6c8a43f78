"""The console line of `loom train` (MonitorCallback): elapsed wall time and an ETA from the recent pace."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loom.launch.train.callbacks import ETA_WINDOW_STEPS, MonitorCallback, format_duration
from tests.logs import captured_lines


@pytest.mark.parametrize(
    "seconds,text",
    [(0, "0s"), (0.4, "0s"), (45, "45s"), (59.6, "1m00s"), (725, "12m05s"), (3599, "59m59s"), (11220, "3h07m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeWriter:
    def scalars(self, values: dict, step: int) -> None: ...

    def flush(self) -> None: ...


@pytest.fixture
def lines():
    with captured_lines() as captured:
        yield captured


def _monitor_and_trainer(lines: list, max_steps: int, log_every: int = 1):
    monitor = MonitorCallback(
        FakeWriter(), log_every, flops_per_step=1e9, peak_tflops=1.0, world_size=1,
        device=torch.device("cpu"), progress=False,
    )  # fmt: skip
    clock = monitor.clock = FakeClock()
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(max_steps=max_steps)),
        state=SimpleNamespace(step=0, consumed_tokens=0),
        tokens_per_step=512,
        loader=SimpleNamespace(),
        module=SimpleNamespace(technique_scalars=dict),
    )
    return monitor, trainer, clock, lines


def _step(monitor, trainer, clock, wall_s: float) -> None:
    clock.now += wall_s
    trainer.state.step += 1
    trainer.state.consumed_tokens += trainer.tokens_per_step
    metrics = {
        "train/loss": 5.0,
        "train/lr": 1e-3,
        "train/grad_norm": 1.0,
        "time/step_s": wall_s,
        "time/data_wait_fraction": 0.0,
    }
    monitor.on_step_end(trainer, metrics)


def test_line_shows_elapsed_time_and_an_eta_from_the_recent_steps(lines):
    monitor, trainer, clock, _ = _monitor_and_trainer(lines, max_steps=300)
    monitor.on_start(trainer)
    clock.now += 30.0  # start-up before the first step counts as elapsed
    for _ in range(100):
        _step(monitor, trainer, clock, 2.0)
    # 230 s elapsed; the last 50 steps took 2 s each, 200 steps remain
    assert lines[-1].startswith("step 100/300 · loss 5.0000")
    assert lines[-1].endswith(" · 51,200 tokens · 3m50s elapsed · ETA 6m40s"), lines[-1]


def test_eta_follows_the_recent_pace_not_the_whole_run(lines):
    monitor, trainer, clock, _ = _monitor_and_trainer(lines, max_steps=200)
    monitor.on_start(trainer)
    for _ in range(100):
        _step(monitor, trainer, clock, 10.0)
    for _ in range(ETA_WINDOW_STEPS):
        _step(monitor, trainer, clock, 1.0)  # the run sped up: only the recent window counts
    assert lines[-1].endswith(f"{format_duration(1050)} elapsed · ETA {format_duration(50 * 1.0)}"), lines[-1]


def test_the_first_line_and_the_last_line(lines):
    monitor, trainer, clock, _ = _monitor_and_trainer(lines, max_steps=4, log_every=2)
    monitor.on_start(trainer)
    _step(monitor, trainer, clock, 3.0)
    assert lines == []  # not a logging step
    _step(monitor, trainer, clock, 5.0)
    assert lines[-1].endswith("8s elapsed · ETA 8s"), lines[-1]  # 4 s a step over 2 steps, 2 to go
    _step(monitor, trainer, clock, 4.0)
    _step(monitor, trainer, clock, 4.0)
    assert lines[-1].endswith("16s elapsed"), lines[-1]  # finished: no ETA
