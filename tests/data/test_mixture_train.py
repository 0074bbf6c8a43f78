"""`loom train` on a two-source mixture of built-in corpora (generated stand-ins in a private corpus
cache): per-source TensorBoard scalars, per-source held-out losses, an exact --resume, and a resume
with new weights."""

from __future__ import annotations

import math
import shutil

import pytest

from tests.data.conftest import make_documents, write_jsonl
from tests.e2e.runner import TINY, read_scalars, run_loom

TOKENS_PER_SAMPLE = 64  # tiny.yaml's seq_length


@pytest.mark.slow
def test_train_on_a_mixture_logs_each_source_and_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for index, name in enumerate(["linuxdoc", "shakespeare"]):
        write_jsonl(cache / f"{name}.jsonl", make_documents(300, seed=200 + index))
    common = [
        f"data.cache_dir={cache}",
        "data.mixture=[{path: linuxdoc, weight: 3}, {path: shakespeare, weight: 1}]",
        "data.val_percent=10",
        "data.samples_per_shard=8",
        "data.num_workers=1",
        "model.vocab_size=320",
        "train.max_steps=6",
        "train.log_every=1",
        "train.eval_every=3",
        "checkpoint.every=3",
    ]
    first = tmp_path / "uninterrupted"
    run_loom(["train", TINY, f"output_dir={first}", *common], nproc=2)
    want = read_scalars(first / "tensorboard")
    consumed = want["train/consumed_tokens"]
    docs, prose = want["data/linuxdoc/tokens"], want["data/shakespeare/tokens"]
    assert sorted(docs) == list(range(1, 7)) and "data/linuxdoc/epoch" in want and "data/shakespeare/epoch" in want
    for step, tokens in consumed.items():
        assert docs[step] + prose[step] == tokens  # every sample of every rank is accounted to its source
        assert abs(docs[step] - 0.75 * tokens) <= 2 * 2 * TOKENS_PER_SAMPLE  # within a sample per stream
    for step in (3, 6):
        per_source = [want[f"eval/{name}/loss"][step] for name in ("linuxdoc", "shakespeare")]
        assert all(math.isfinite(loss) for loss in per_source)
        assert want["eval/loss"][step] == pytest.approx(sum(per_source) / 2)  # held-out sets weigh 1 each

    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    run_loom(["train", TINY, f"output_dir={resumed}", *common, "--resume", "auto"], nproc=2)
    got = read_scalars(resumed / "tensorboard")
    for tag in ("train/loss", "data/linuxdoc/tokens", "data/shakespeare/tokens"):
        assert {s: got[tag][s] for s in (4, 5, 6)} == {s: want[tag][s] for s in (4, 5, 6)}, tag

    reweighted = tmp_path / "reweighted"
    shutil.copytree(first / "checkpoints" / "step_00000003", reweighted / "checkpoints" / "step_00000003")
    new_weights = "data.mixture=[{path: linuxdoc, weight: 1}, {path: shakespeare, weight: 1}]"
    out = run_loom(["train", TINY, f"output_dir={reweighted}", *common, new_weights, "--resume", "auto"], nproc=2)
    assert "data.mixture weights changed since the checkpoint" in out.stdout + out.stderr
    changed = read_scalars(reweighted / "tensorboard")
    assert changed["data/linuxdoc/tokens"][3 + 3] - want["data/linuxdoc/tokens"][3] == pytest.approx(
        0.5 * 3 * 16 * TOKENS_PER_SAMPLE, abs=2 * 2 * TOKENS_PER_SAMPLE
    )  # half of the 3 steps' 16 samples each go to linuxdoc after the change
