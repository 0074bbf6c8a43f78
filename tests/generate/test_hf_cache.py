"""The exported model generates with transformers' cache: `generate()` with `use_cache=True` equals
recomputing the sequence (`use_cache=False`) — the same greedy tokens and logits within 1e-5 over 256
new tokens, on a left-padded batch crossing document boundaries — for Loom's remote code with every
technique alone and all five, and for a plain-Llama export (transformers' own `LlamaForCausalLM`). Both
agree with Loom's own decoder; `past_key_values` can be reused and beam search reorders the techniques'
state with the keys and values."""

from __future__ import annotations

import pytest
import torch

from loom.launch.convert.hf_export import to_hf
from loom.launch.generate.decode import left_padded
from tests.generate.common import (
    CONFIGS,
    EOS,
    FORCED_EOS,
    NEW_TOKENS,
    TOLERANCE,
    greedy_mismatches,
    max_diff,
    model_config,
    prompts,
    recording_greedy,
    write_model_folder_fn,
)
from tests.harness import run_distributed

LOOM_VS_HF = 1e-4
"""Loom's decoder and the exported model are two implementations (as in tests/convert): 1e-4 apart at most."""


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """name → (consolidated folder, remote-code export); plus "llama": the baseline as a plain Llama."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, tech in CONFIGS.items():
        slug = name.replace(" ", "_").replace(",", "")
        folder = run_distributed(write_model_folder_fn, 1, str(root / slug), model_config(), tech)[0]
        out[name] = (folder, str(to_hf(folder, root / f"{slug}_hf", remote_code=True, skip_tokenizer=True)))
    out["llama"] = (out["baseline"][0], str(to_hf(out["baseline"][0], root / "llama_hf", skip_tokenizer=True)))
    return out


def _load(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # decode past EOS: documents also end inside the generation
    return model


class _Steer:
    """A logits processor: EOS at the forced steps, or (with `follow`) exactly the given tokens."""

    def __init__(self, prompt_width: int, follow: torch.Tensor | None = None):
        self.prompt_width, self.follow = prompt_width, follow

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        pick = self.follow[:, step] if self.follow is not None else None
        if pick is None and step in FORCED_EOS:
            pick = torch.full((scores.shape[0],), EOS)
        if pick is None:
            return scores
        steered = torch.full_like(scores, float("-inf"))
        steered[torch.arange(scores.shape[0]), pick] = 0.0
        return steered


def hf_generate(model, rows, new_tokens: int, use_cache: bool, follow=None) -> dict:
    from transformers import LogitsProcessorList

    ids, real = left_padded(rows)
    out = model.generate(
        ids,
        attention_mask=real.long(),
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([_Steer(ids.shape[1], follow)]),
        output_logits=True,
        return_dict_in_generate=True,
    )
    return {"ids": out.sequences[:, ids.shape[1] :], "logits": torch.stack(out.logits), "cache": out.past_key_values}


def _loom_following_fn(rank, world, folder: str, rows, follow: torch.Tensor) -> torch.Tensor:
    """Loom's cached decoder on the consolidated folder (loaded as `loom generate` loads it), on `follow`."""
    from loom.launch.generate.decode import StageRunner, decode
    from loom.launch.generate.load import load_model
    from tests.generate.common import one_process_grid

    loaded = load_model(folder, one_process_grid())
    choose, logits = recording_greedy(loaded.model.vocab_size, EOS, follow=follow)
    decode(StageRunner(loaded.stage, choose), rows, follow.shape[1])
    return torch.stack(logits)


@pytest.mark.parametrize("name", [*CONFIGS, "llama"])
def test_generate_with_the_cache_matches_recomputing(exports, name):
    model, rows = _load(exports[name][1]), prompts()
    assert type(model).__name__ == ("LlamaForCausalLM" if name == "llama" else "LoomForCausalLM")
    cached = hf_generate(model, rows, NEW_TOKENS, use_cache=True)
    uncached = hf_generate(model, rows, NEW_TOKENS, use_cache=False, follow=cached["ids"])
    assert torch.equal(cached["ids"], uncached["ids"]) and cached["ids"].shape == (3, NEW_TOKENS)
    diff = max_diff(cached["logits"], uncached["logits"])
    assert diff <= TOLERANCE, f"{name}: cached logits differ by {diff:.3g}"
    mismatches = greedy_mismatches(cached["ids"], uncached["logits"])
    assert not mismatches, f"{name}: cached tokens are not the uncached greedy choice at {mismatches}"
    if name != "llama":  # the techniques' state travels in the cache transformers handed the model
        layers = cached["cache"].layers
        assert all(type(layer).__name__ == "LoomCacheLayer" for layer in layers)
        tech = CONFIGS[name]
        assert any(layer.lcm is not None for layer in layers) == tech.lcm.enabled
        assert any(layer.scr is not None for layer in layers) == tech.scr.enabled
    loom = run_distributed(_loom_following_fn, 1, exports[name][0], rows, cached["ids"])[0]
    across = max_diff(loom, cached["logits"][..., : loom.shape[-1]])
    assert across <= LOOM_VS_HF, f"{name}: Loom's decoder and the export differ by {across:.3g}"


def test_a_window_of_k_minus_one_states_is_caught(exports):
    model, rows = _load(exports["lcm"][1]), prompts()
    lcm_class = type(next(block.lcm for block in model.layers if block.lcm is not None))
    original = lcm_class._anchor_from_window

    def forgetful(self, hf, pos, state):
        state.lcm = torch.cat([torch.zeros_like(state.lcm[:, :1]), state.lcm[:, 1:]], dim=1)  # lag K lost
        return original(self, hf, pos, state)

    cached = hf_generate(model, rows, 64, use_cache=True)
    lcm_class._anchor_from_window = forgetful
    try:
        broken = hf_generate(model, rows, 64, use_cache=True, follow=cached["ids"])
    finally:
        lcm_class._anchor_from_window = original
    assert max_diff(cached["logits"], broken["logits"]) > 100 * TOLERANCE


def test_past_key_values_can_be_reused(exports):
    from transformers import DynamicCache

    model = _load(exports["all five, other knobs"][1])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 300, (2, 30), generator=g)
    ids[0, 12] = EOS
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache = DynamicCache()
        first = model(ids[:, :20], past_key_values=cache, use_cache=True)
        one = model(ids[:, 20:21], past_key_values=first.past_key_values, use_cache=True)
        rest = model(ids[:, 21:], past_key_values=one.past_key_values, use_cache=True)  # several tokens at once
    assert rest.past_key_values is cache and cache.get_seq_length() == 30
    pieces = torch.cat([first.logits, one.logits, rest.logits], dim=1)
    assert max_diff(pieces, whole) <= TOLERANCE


def test_beam_search_reorders_the_techniques_state(exports):
    model, rows = _load(exports["all five"][1]), prompts()[:2]
    ids, real = left_padded(rows)
    runs = [
        model.generate(
            ids, attention_mask=real.long(), max_new_tokens=12, num_beams=3, do_sample=False, use_cache=use_cache
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])
