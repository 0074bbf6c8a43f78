"""`loom convert consolidate`: full fp32 weights from any layout, exactly the live model's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loom.launch.checkpoint.layout import CONSOLIDATED_INFO, CONSOLIDATED_WEIGHTS
from loom.launch.checkpoint.reader import load
from loom.launch.convert.consolidate import consolidate
from tests.e2e.runner import run_loom

pytestmark = pytest.mark.slow  # every test here needs checkpoints that conftest.py trains through torchrun


@pytest.mark.parametrize("source", ["ckpt_dp2_zero2", "ckpt_zero3"])
def test_consolidated_weights_equal_the_live_model(source, request, tmp_path):
    ckpt, live = request.getfixturevalue(source)
    out = tmp_path / "full"
    consolidate(ckpt, out, optimizer=True)
    weights = load_file(str(out / CONSOLIDATED_WEIGHTS))
    assert set(weights) == set(live)
    for name, value in live.items():
        got = weights[name]
        assert got.dtype == torch.float32
        want = value[: got.shape[0]] if name in ("embedding.weight", "output_layer.weight") else value
        assert torch.equal(got, want), name
    assert weights["embedding.weight"].shape[0] == 2048  # vocabulary rows, no TP padding
    info = json.loads((out / CONSOLIDATED_INFO).read_text())
    assert info["model"]["hidden_size"] == 64 and info["optimizer"]["step"] == 2.0
    assert info["source"]["layout"]["zero"] in (2, 3)


def test_cli_consolidate_drops_the_tied_pipeline_copy(ckpt_tp2_pp2, tmp_path):
    out = tmp_path / "full"
    proc = run_loom(["convert", "consolidate", ckpt_tp2_pp2, str(out)])
    assert "TP 2 × PP 2" in proc.stdout
    weights = load_file(str(out / CONSOLIDATED_WEIGHTS))
    assert "output_layer.weight" not in weights  # tied: the last stage's copy is the embedding
    assert (out / "tokenizer.model").is_file() and (out / "MANIFEST.json").is_file()
    # a consolidated folder is itself a valid source
    again = load(out)
    assert set(again.weights) == set(weights)
    assert again.model.tie_embeddings and again.source["layout"] == {"tp": 2, "pp": 2, "dp": 1, "zero": 1}


def test_bf16_checkpoints_consolidate_their_fp32_masters(tmp_path, tokenizer_model):
    from tests.convert.common import HARNESS_OVERRIDES, fixed_batches, layout_run_fn
    from tests.harness import run_distributed

    live = run_distributed(
        layout_run_fn,
        2,
        HARNESS_OVERRIDES,
        1,
        1,
        1,
        fixed_batches(4),
        save_dir=str(tmp_path),
        tokenizer=tokenizer_model,
        train_steps=2,
        precision="bf16",
    )[0]
    data = load(tmp_path / "checkpoints" / "step_00000002", optimizer=True)
    assert data.optimizer is not None and data.optimizer_step == 2.0
    for name, master in live["masters"].items():
        got = data.weights[name]
        want = master[: got.shape[0]] if name in ("embedding.weight", "output_layer.weight") else master
        assert torch.equal(got, want), name  # the fp32 master, not the bf16 working copy
    assert not torch.equal(
        data.weights["layers.0.attention.qkv.weight"], live["weights"]["layers.0.attention.qkv.weight"]
    )
