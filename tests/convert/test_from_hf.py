"""`loom convert from-hf`: a Llama HF folder → a Loom start point that loads at any layout (with
techniques switched on, identity at init) and exports back to the very same HF weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loom.launch.checkpoint.consolidated import Consolidated, read_consolidated, write_consolidated
from loom.launch.convert.hf_export import to_hf
from loom.launch.convert.hf_import import from_hf

pytestmark = pytest.mark.slow  # every test here needs checkpoints that conftest.py trains through torchrun


def _load_at_tp2_fn(rank, world_size, start: str):
    """Load the start point into a TP=2 ZeRO-1 engine with LCM, SCR and CMR on; gather it back."""
    import copy

    from loom.launch.checkpoint.start_point import load_start_point
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.consolidate import full_state_dict
    from loom.model.parallel.parallelize import parallelize
    from tests.convert.common import _init
    from tests.parallel.common import OPTIM

    layout = _init(rank, 2, 1)
    data = read_consolidated(start)
    tech = data.techniques
    tech.lcm.enabled, tech.scr.enabled, tech.cmr.enabled = True, True, True
    tech.scr.rank, tech.cmr.rank = 8, 8
    sharded = parallelize(
        data.model,
        tech,
        layout,
        ParallelConfig(tensor=2, zero_stage=1),
        optim=copy.copy(OPTIM),
        micro_batch_size=2,
        seed=0,
        precision="fp32",
    )
    meta = load_start_point(sharded, start, data.model, tokenizer_sha256=data.tokenizer_sha256())
    from omegaconf import OmegaConf

    return full_state_dict(sharded.module), OmegaConf.to_container(OmegaConf.structured(tech)), meta["state"]


def test_from_hf_load_to_hf_is_the_identity(ckpt_tp2_pp2, tmp_path):
    from tests.harness import run_distributed

    hf = tmp_path / "hf"
    to_hf(ckpt_tp2_pp2, hf)
    start = tmp_path / "start"
    from_hf(hf, start)
    assert (start / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    from loom.launch.config import load_config

    cfg = load_config(str(start / "config.yaml"), check_files=False)
    assert cfg.model.tie_embeddings and cfg.model.num_kv_heads == 2 and cfg.model.ffn_hidden_size == 192

    weights, tech, state = run_distributed(_load_at_tp2_fn, 2, str(start))[0]
    assert state["step"] == 0
    assert any(".lcm." in n for n in weights)  # techniques switched on, fresh (identity) init
    data = read_consolidated(start)
    back = tmp_path / "back"
    back.mkdir()
    write_consolidated(
        Consolidated(weights=weights, run_config={**data.run_config, "techniques": tech}, tokenizer=data.tokenizer),
        back,
    )
    hf2 = tmp_path / "hf2"
    to_hf(back, hf2)  # LCM/SCR/CMR are the identity, so it is a plain Llama again
    a, b = load_file(str(hf / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (hf, hf2))
    assert config_a == config_b
