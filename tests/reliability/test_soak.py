"""A soak run: a few thousand steps with periodic checkpoints and two resumes. Memory stays flat
and no file descriptors, threads or processes leak (read back from the run's own scalars)."""

import pytest

from tests.e2e.runner import TINY, read_scalars, run_loom

SEGMENTS = (800, 1600, 2400)
WARMUP_STEPS = 300  # allocator and data-pool caches fill up at the start of each process
# README: RSS is flat when the least-squares slope of RSS over steps, fitted within each segment (one
# process each, so each gets its own intercept) through every logged point after the warm-up, projects
# to at most 5 % of the median RSS over all 2,400 steps (a leak of 20 KB a step fails it: 48 MB vs 25 MB).
MAX_GROWTH_FRACTION = 0.05


def pooled_slope(segments: list[list[tuple[int, float]]]) -> float:
    """Least-squares slope shared by all segments, each with its own intercept (within-segment fit)."""
    num = den = 0.0
    for points in segments:
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        num += sum((x - mean_x) * (y - mean_y) for x, y in points)
        den += sum((x - mean_x) ** 2 for x, _ in points)
    return num / den


def test_pooled_slope_recovers_a_known_leak():
    leak = 0.001  # GB per step, on a different baseline per segment, plus alternating noise
    segments = [
        [(s, base + leak * s + (0.01 if s % 100 else -0.01)) for s in range(start, start + 500, 50)]
        for start, base in ((300, 1.0), (1100, 1.2), (1900, 0.9))
    ]
    assert pooled_slope(segments) == pytest.approx(leak, rel=0.05)


@pytest.mark.slow
def test_soak_with_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "run"
    common = [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.ffn_hidden_size=64",
        "model.seq_length=32",
        "train.micro_batch_size=2",
        "parallel.microbatches=1",
        "checkpoint.every=200",
        "checkpoint.keep_last=2",
        "train.log_every=50",
        "train.eval_every=0",
        "data.num_workers=1",
    ]
    for i, steps in enumerate(SEGMENTS):
        extra = ["--resume", "auto"] if i else []
        run_loom(["train", TINY, f"output_dir={run}", f"train.max_steps={steps}", *common, *extra], timeout=900)
    scalars = read_scalars(run / "tensorboard")
    assert sorted(scalars["train/consumed_tokens"])[-1] == SEGMENTS[-1]
    rss = scalars["memory/rss_gb"]
    segments = []
    for start, end in zip((0,) + SEGMENTS, SEGMENTS):
        points = sorted((s, v) for s, v in rss.items() if start + WARMUP_STEPS <= s <= end)
        assert len(points) >= 8, f"too few RSS points within steps {start}-{end}: {points}"
        segments.append(points)
        for tag in ("system/open_fds", "system/threads", "system/child_processes"):
            values = [v for s, v in scalars[tag].items() if start + WARMUP_STEPS <= s <= end]
            assert max(values) - min(values) <= 2, f"{tag} drifts within steps {start}-{end}: {values}"
    slope = pooled_slope(segments)  # GB per step
    values = sorted(v for points in segments for _, v in points)
    median = values[len(values) // 2]
    growth = slope * SEGMENTS[-1]
    assert growth <= MAX_GROWTH_FRACTION * median, (
        f"RSS grows {slope * 1e6:.1f} MB per 1,000 steps: {growth * 1e3:.0f} MB over {SEGMENTS[-1]} steps, more than "
        f"{MAX_GROWTH_FRACTION:.0%} of the median RSS {median:.3f} GB; points {segments}"
    )
    assert len(list((run / "checkpoints").glob("step_*"))) == 2, "retention keeps the last two"
