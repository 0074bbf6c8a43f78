"""`loom convert to-hf`: the exported model computes Loom's logits, generates, and its tokenizer
encodes like Loom's; LCM/SCR/CMR models export with Loom's own modeling code."""

from __future__ import annotations

import json

import pytest
import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.convert.hf_export import active_techniques, remote_code_techniques, to_hf
from tests.convert.common import loom_logits_fn, sample_tokens
from tests.harness import run_distributed

TEXTS = [
    "To be, or not to be, that is the question:",
    "Hello world",
    "x = 12345 + 0.5e-3",
    "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;",
    "naïve café — 東京 😀",
]


def _load_hf(folder, remote_code=False):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=remote_code, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
@pytest.mark.parametrize("source", ["ckpt_tp2_pp2", "ckpt_dp2_zero2", "ckpt_zero3"])
def test_exported_llama_matches_loom_logits_and_generates(source, request, tmp_path):
    ckpt = request.getfixturevalue(source)
    ckpt = ckpt[0] if isinstance(ckpt, tuple) else ckpt
    out = tmp_path / "hf"
    to_hf(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 2048  # padding rows cut
    assert config["tie_word_embeddings"] == (source == "ckpt_tp2_pp2")

    tokens = sample_tokens()
    ref = run_distributed(loom_logits_fn, 1, ckpt, tokens)[0]
    model = _load_hf(out)
    with torch.no_grad():
        got = model(tokens).logits
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"HF logits differ from Loom's by {err:.3g}"

    prompt = tokens[:1, :6]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert generated.shape == (1, 10) and torch.equal(generated[:, :6], prompt)
    with torch.no_grad():  # greedy generation = argmax of the same logits Loom computes
        assert int(generated[0, 6]) == int(ref[0, 5].argmax())


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_exported_tokenizer_encodes_like_loom(ckpt_tp2_pp2, tmp_path):
    from transformers import AutoTokenizer

    from loom.data.tokenizer import Tokenizer

    out = tmp_path / "hf"
    to_hf(ckpt_tp2_pp2, out)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    loom_tok = Tokenizer(f"{ckpt_tp2_pp2}/tokenizer.model")
    for text in TEXTS:
        ids = loom_tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text
        assert hf_tok.encode(text) == [loom_tok.bos_id] + ids, text  # the exported tokenizer adds BOS
        assert hf_tok.decode(ids) == loom_tok.decode(ids)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        loom_tok.bos_id,
        loom_tok.eos_id,
        loom_tok.pad_id,
    )
    assert "adds no BOS" in (out / "README.md").read_text()


@pytest.mark.slow  # needs a checkpoint conftest.py trains through torchrun
def test_trained_techniques_need_remote_code_and_match_loom(ckpt_techniques, tmp_path):
    from loom.launch.checkpoint.reader import load

    data = load(ckpt_techniques)
    assert active_techniques(data.weights, data.techniques) == ["LCM", "SCR", "CMR"]
    with pytest.raises(ConvertError, match="--remote-code"):
        to_hf(ckpt_techniques, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

    out = tmp_path / "remote"
    to_hf(ckpt_techniques, out, remote_code=True)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_loom.LoomForCausalLM"
    assert set(config["techniques"]) == {"lcm", "scr", "cmr"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not any(".sca." in n for n in names), "SCA is training-only and must not be exported"
    source = (out / "modeling_loom.py").read_text()
    assert "from launch" not in source and "import techniques" not in source  # self-contained

    tokens = sample_tokens(length=48)
    ref = run_distributed(loom_logits_fn, 1, ckpt_techniques, tokens)[0]
    model = _load_hf(out, remote_code=True)
    with torch.no_grad():
        got = model(tokens).logits
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"remote-code logits differ from Loom's by {err:.3g}"
    # the techniques matter: the same weights without them give other logits
    assert (got - run_distributed(_plain_logits_fn, 1, ckpt_techniques, tokens)[0]).abs().max() > 1e-3
    generated = model.generate(tokens[:1, :8], max_new_tokens=3, do_sample=False, use_cache=False)
    assert generated.shape == (1, 11)
    assert int(generated[0, 8]) == int(ref[0, 7].argmax())


def _plain_logits_fn(rank, world_size, source, tokens):
    """Loom's logits with the techniques switched off (core weights only)."""
    from loom.launch.checkpoint.reader import load
    from loom.launch.checkpoint.start_point import load_into_stage
    from loom.model.parallel.parallelize import build_stage
    from loom.techniques.config import TechniquesConfig
    from tests.convert.common import _init

    layout = _init(rank, 1, 1)
    data = load(source)
    stage = build_stage(data.model, TechniquesConfig(), layout, seed=0)
    load_into_stage(stage, data.weights)
    stage.eval()
    with torch.no_grad():
        logits = stage(torch.cat([tokens, tokens[:, :1]], 1), return_logits=True)
    return logits.transpose(0, 1)[..., : data.model.vocab_size].contiguous()


def test_remote_code_cmr_slots_follow_the_saved_pipeline_when_stage_local():
    from loom.model.config import ModelConfig
    from loom.techniques.config import TechniquesConfig

    cfg = ModelConfig(num_layers=8)
    tech = TechniquesConfig()
    tech.cmr.enabled = True  # sources h^0, h^2, h^4, h^5; targets h^6, h^8
    everywhere = remote_code_techniques(tech, cfg, source_pp=2)["cmr"]["readable"]
    assert everywhere == {"6": [0, 1, 2, 3], "8": [0, 1, 2, 3]}
    tech.cmr.stage_local = True  # with PP=2 the second stage holds blocks 4..7: its input h^4 is captured on
    local = remote_code_techniques(tech, cfg, source_pp=2)["cmr"]  # the first stage, so only h^5 is readable
    assert local["readable"] == {"6": [3], "8": [3]} and local["reset_bank_at"] == [4]
    four = remote_code_techniques(tech, cfg, source_pp=4)["cmr"]  # blocks 6..7 capture no source: h^8 is skipped
    assert four["readable"] == {"6": [3], "8": []} and four["reset_bank_at"] == [2, 4, 6]
