"""`loom eval` on a ZeRO-3 checkpoint, whose weights exist only as data-parallel partitions.

Two checkpoints are trained the same way (same seed, batches and steps, DP=2) except for the ZeRO
stage: ZeRO-1 (full module weights per model-parallel rank) and ZeRO-3. They hold the same network
up to float rounding, so `loom eval` must report the same held-out loss on both."""

import json
import random
from pathlib import Path

import pytest

from tests.convert.common import HARNESS_OVERRIDES, assert_weights_close, fixed_batches, layout_run_fn
from tests.e2e.runner import run_loom
from tests.harness import run_distributed

VOCAB = 360  # trains in a second on the generated text; not a multiple of 128, so the vocabulary is padded
OVERRIDES = HARNESS_OVERRIDES + [f"model.vocab_size={VOCAB}"]
WORDS = (
    "the king and queen of a small town walked over green hills to see ships sail on cold grey water while "
    "children sang old songs about bread wine stone fire rain wind night day gold silver iron glass"
).split()


@pytest.fixture(scope="module")
def heldout_text_and_tokenizer(tmp_path_factory) -> tuple[str, str]:
    from loom.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("zero3_data")
    rng = random.Random(0)
    paragraphs = []
    for _ in range(60):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
            for _ in range(rng.randint(2, 5))
        ]
        paragraphs.append(" ".join(sentences))
    text = folder / "heldout.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    return str(text), str(train_tokenizer([str(text)], folder / "tok", vocab_size=VOCAB))


def _train_and_save(run: Path, zero: int, tokenizer: str) -> tuple[Path, dict]:
    out = run_distributed(
        layout_run_fn,
        2,
        OVERRIDES,
        1,
        1,
        zero,
        fixed_batches(4, vocab=VOCAB),
        save_dir=str(run),
        tokenizer=tokenizer,
        train_steps=2,
    )[0]
    return run / "checkpoints" / "step_00000002", out["weights"]


def _loaded_weights(rank, world, folder: str) -> dict:
    from loom.launch.eval.model import EvalModel
    from loom.model.parallel.consolidate import full_state_dict

    return full_state_dict(EvalModel(Path(folder)).module)


def _heldout_nll(ckpt: Path, text: str, out: Path) -> float:
    run_loom(
        [
            "eval",
            str(ckpt),
            "--data",
            text,
            "--train-data",
            text,
            "--metrics",
            "loss",
            "--profile",
            "quick",
            "--out",
            str(out),
            "--tb",
            str(out.parent / f"tb_{out.stem}"),
        ]
    )
    result = json.loads(out.read_text())
    assert result["step"] == 2
    return result["metrics"]["loss/heldout_nll"]


@pytest.mark.slow
def test_loom_eval_reads_zero3_checkpoints(tmp_path, heldout_text_and_tokenizer):
    text, tokenizer = heldout_text_and_tokenizer
    zero3, trained = _train_and_save(tmp_path / "z3", 3, tokenizer)
    zero1, _ = _train_and_save(tmp_path / "z1", 1, tokenizer)
    assert json.loads((zero3 / "meta.json").read_text())["layout"]["zero"] == 3
    assert not list((zero3 / "ds" / "state").glob("mp_rank_*_model_states.pt"))  # no full weights on disk

    loaded = run_distributed(_loaded_weights, 1, str(zero3))[0]
    assert_weights_close(trained, loaded, VOCAB, rel=1e-6, what="ZeRO-3 checkpoint in the eval model:")

    nll_zero3 = _heldout_nll(zero3, text, tmp_path / "zero3.json")
    nll_zero1 = _heldout_nll(zero1, text, tmp_path / "zero1.json")
    assert nll_zero3 == pytest.approx(nll_zero1, rel=1e-5)
