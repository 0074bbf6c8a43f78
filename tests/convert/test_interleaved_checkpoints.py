"""Checkpoints of an interleaved pipeline (`parallel.virtual_stages` 2: each rank's file holds the blocks of
two non-adjacent chunks) consolidate, reshard to one chunk per rank or one process and back with the
loss on a fixed batch and the next step unchanged, and export to Hugging Face."""

from __future__ import annotations

import json

import pytest
import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.reader import load
from loom.launch.convert.hf_export import to_hf
from loom.launch.convert.reshard import reshard
from tests.convert.common import HARNESS_OVERRIDES, assert_weights_close, fixed_batches, layout_run_fn, sample_tokens
from tests.harness import run_distributed

MICROBATCHES = 2  # per step: a multiple of the pipeline size, as interleaving needs


def _run(world, tp, pp, zero, vp, batches, **kwargs):
    return run_distributed(
        layout_run_fn,
        world,
        HARNESS_OVERRIDES,
        tp,
        pp,
        zero,
        batches,
        virtual_stages=vp,
        microbatches=MICROBATCHES,
        timeout=600,
        **kwargs,
    )[0]


def _same_continuation(ref: dict, got: dict, what: str) -> None:
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6, abs=1e-6), what
    assert got["then"][0] == pytest.approx(ref["then"][0], rel=1e-6, abs=1e-6), what
    assert_weights_close(ref["weights"], got["weights"], 2048, what=what)


@pytest.fixture(scope="module")
def interleaved_run(tmp_path_factory):
    """PP=2 × 2 chunks, ZeRO-1: 2 steps, a checkpoint, the loss on a fixed batch, then step 3."""
    run = tmp_path_factory.mktemp("pp2vp2")
    batches = fixed_batches(8)
    ref = _run(2, 1, 2, 1, 2, batches, save_dir=str(run), train_steps=2, then_steps=1)
    return run / "checkpoints" / "step_00000002", batches, ref


def test_interleaved_checkpoint_records_its_chunks_and_consolidates(interleaved_run):
    ckpt, _, ref = interleaved_run
    assert json.loads((ckpt / "meta.json").read_text())["layout"] == {"tp": 1, "pp": 2, "dp": 1, "zero": 1, "vp": 2}
    data = load(ckpt)
    assert data.source["layout"]["vp"] == 2
    assert {n for n in data.weights if n.startswith("layers.")} == {
        n for n in ref["weights"] if n.startswith("layers.")
    }


def test_interleaved_checkpoint_with_a_wrong_chunk_count_is_refused(interleaved_run, tmp_path):
    import shutil

    ckpt, _, _ = interleaved_run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "meta.json").read_text())
    del meta["layout"]["vp"]  # as if one chunk per rank: rank 0's file would hold blocks 0 and 1
    (copy / "meta.json").write_text(json.dumps(meta))
    from loom.launch.checkpoint.manifest import write_manifest

    write_manifest(copy)
    with pytest.raises(
        ConvertError, match=r"pipeline stage 0 of the checkpoint holds blocks \[0, 2\], expected \[0, 1\]"
    ):
        load(copy)


def test_interleaved_checkpoint_reshards_to_one_process_and_back(interleaved_run, tmp_path):
    ckpt, batches, ref = interleaved_run
    # PP=2 × 2 chunks → one process (the chunk count no longer fits PP 1, so it drops to 1)
    reshard(ckpt, tmp_path / "to_pp1", pipeline=1)
    one = _run(1, 1, 1, 0, 1, batches, start=str(tmp_path / "to_pp1"), save_dir=str(tmp_path / "b"), then_steps=1)
    _same_continuation(ref, one, "PP1 from PP2×vp2")

    # and one process's checkpoint → PP=2 × 2 chunks again
    reshard(tmp_path / "b" / "checkpoints" / "step_00000002", tmp_path / "to_vp2", pipeline=2, virtual_stages=2)
    back = _run(2, 1, 2, 1, 2, batches, start=str(tmp_path / "to_vp2"), then_steps=1)
    _same_continuation(ref, back, "PP2×vp2 from PP1")


def test_interleaved_checkpoint_reshards_to_one_chunk_per_rank(interleaved_run, tmp_path):
    ckpt, batches, ref = interleaved_run
    reshard(ckpt, tmp_path / "to_vp1", virtual_stages=1)
    assert "virtual_stages: 1\n" in (tmp_path / "to_vp1" / "config.yaml").read_text()
    vp1 = _run(2, 1, 2, 1, 1, batches, start=str(tmp_path / "to_vp1"), then_steps=1)
    _same_continuation(ref, vp1, "PP2×vp1 from PP2×vp2")


def test_interleaved_checkpoint_exports_to_hugging_face(interleaved_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.convert.common import loom_logits_fn

    ckpt, _, _ = interleaved_run
    to_hf(ckpt, tmp_path / "hf", skip_tokenizer=True)
    tokens = sample_tokens()
    ref = run_distributed(loom_logits_fn, 1, str(ckpt), tokens)[0]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(tokens).logits
    assert (got - ref).abs().max().item() <= 1e-4


def _eval_model_weights(rank, world, folder: str) -> dict:
    from pathlib import Path

    from loom.launch.eval.model import EvalModel
    from loom.model.parallel.consolidate import full_state_dict

    model = EvalModel(Path(folder))
    assert model.module.virtual_stages == 1  # evaluation runs one chunk per rank, weights consolidated on load
    return full_state_dict(model.module)


def test_interleaved_checkpoint_loads_for_evaluation_at_its_pipeline_size(interleaved_run):
    ckpt, _, _ = interleaved_run
    loaded = run_distributed(_eval_model_weights, 2, str(ckpt), timeout=600)[0]
    saved = load(ckpt).weights
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        assert torch.equal(loaded[name][: value.shape[0]], value), name
