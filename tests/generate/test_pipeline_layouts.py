"""The cache across a TP=2 × PP=2 layout: every stage keeps its own blocks' state (SCR's ρ and CMR's bank
cross stages per token), so `loom eval`'s greedy decoding and the end-of-run sample decode with the cache
at any layout — the same tokens as recomputing the sequence and as one process on the same weights — and
`loom generate` consolidates the checkpoint through the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.convert.common import HARNESS_OVERRIDES, TECHNIQUES, fixed_batches, layout_run_fn, run_config
from tests.generate.common import TOLERANCE, VOCAB, write_model_folder_fn
from tests.harness import run_distributed

OVERRIDES = [*HARNESS_OVERRIDES, f"model.vocab_size={VOCAB}", *TECHNIQUES]
NEW = 40


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (12, 7)]
    rows[0][4] = 3  # EOS inside the prompt
    return rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """A consolidated folder with active techniques, and the same weights saved by a TP=2 × PP=2 ZeRO-1 run."""
    from loom.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("layouts")
    text = root / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)))
    tokenizer = str(train_tokenizer([str(text)], root / "small", vocab_size=VOCAB))
    cfg = run_config(OVERRIDES)
    source = run_distributed(write_model_folder_fn, 1, str(root / "source"), cfg.model, cfg.techniques, tokenizer)[0]
    batches = fixed_batches(1, vocab=VOCAB)
    run_distributed(
        layout_run_fn, 4, OVERRIDES, 2, 2, 1, batches, start=source, save_dir=str(root / "run"), tokenizer=tokenizer
    )
    return {"source": source, "tp2pp2": str(root / "run" / "checkpoints" / "step_00000000"), "tokenizer": tokenizer}


def _eval_generate_fn(rank, world, folder: str) -> dict | None:
    from loom.launch.eval.model import EvalModel
    from loom.launch.train.sample import greedy_generate

    model = EvalModel(Path(folder))
    cached = model.generate(_prompts(), NEW, use_cache=True)
    uncached = model.generate(_prompts(), NEW, use_cache=False)
    windowed = model.generate(_prompts(), NEW, limit=16), model.generate(_prompts(), NEW, limit=16, use_cache=False)
    sample = greedy_generate(model.module, _prompts()[1], NEW, model.dtype, model.device)
    if rank != 0:
        return None
    return {"cached": cached, "uncached": uncached, "windowed": windowed, "sample": sample}


@pytest.mark.slow  # four forked ranks build DeepSpeed engines and evaluation stages
def test_eval_and_the_sample_decode_with_the_cache_across_the_pipeline(checkpoints):
    split = run_distributed(_eval_generate_fn, 4, checkpoints["tp2pp2"], timeout=900)[0]
    single = run_distributed(_eval_generate_fn, 1, checkpoints["source"])[0]
    for run in (split, single):
        np.testing.assert_array_equal(run["cached"][0], run["uncached"][0])
        assert np.abs(run["cached"][1] - run["uncached"][1]).max() <= TOLERANCE
        np.testing.assert_array_equal(run["windowed"][0][0], run["windowed"][1][0])  # past the window too
        assert run["cached"][0].shape == (2, NEW)
    np.testing.assert_array_equal(split["cached"][0], single["cached"][0])
    assert np.abs(split["cached"][1] - single["cached"][1]).max() <= 1e-4  # TP's reductions, another order
    assert split["sample"] == single["sample"]


@pytest.mark.slow  # the checkpoint fixture above
def test_generate_consolidates_any_checkpoint_layout(checkpoints):
    from tests.e2e.runner import run_loom

    outputs = []
    for name in ("tp2pp2", "source"):
        proc = run_loom(["generate", checkpoints[name], "--prompt", "the quick", "--max-new-tokens", "16"])
        assert f"generate: checkpoint {Path(checkpoints[name]).resolve()}" in proc.stdout
        outputs.append([line for line in proc.stdout.splitlines() if line.startswith("the quick")])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 1
