"""A soak run: a few thousand steps with periodic checkpoints and two resumes. Memory stays flat
and no file descriptors, threads or processes leak (read back from the run's own scalars)."""

import pytest

from tests.e2e.runner import TINY, read_scalars, run_loom

SEGMENTS = (800, 1600, 2400)


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
        "train.log_every=100",
        "train.eval_every=0",
        "data.num_workers=1",
    ]
    for i, steps in enumerate(SEGMENTS):
        extra = ["--resume", "auto"] if i else []
        run_loom(["train", TINY, f"output_dir={run}", f"train.max_steps={steps}", *common, *extra], timeout=900)
    scalars = read_scalars(run / "tensorboard")
    assert sorted(scalars["train/consumed_tokens"])[-1] == SEGMENTS[-1]
    for start, end in zip((0,) + SEGMENTS, SEGMENTS):
        segment = {s: v for s, v in scalars["memory/rss_gb"].items() if start + 300 <= s <= end}
        rss = [segment[s] for s in sorted(segment)]
        assert rss[-1] <= rss[0] * 1.05 + 0.05, f"RSS grows within steps {start}-{end}: {rss}"
        for tag in ("system/open_fds", "system/threads", "system/child_processes"):
            values = [v for s, v in scalars[tag].items() if start + 300 <= s <= end]
            assert max(values) - min(values) <= 2, f"{tag} drifts within steps {start}-{end}: {values}"
    assert len(list((run / "checkpoints").glob("step_*"))) == 2, "retention keeps the last two"
