"""Loom's cached decoding equals recomputing the whole sequence every step: the same greedy tokens and
logits within 1e-5 (fp32) over 256 new tokens, for the baseline, each technique alone and all five, on a
left-padded batch whose prompts cross document boundaries (and EOS emitted during decoding). The
uncached path itself is pinned to the training forward, and a padded row to the same prompt alone."""

from __future__ import annotations

import pytest
import torch

from tests.generate.common import (
    CONFIGS,
    EOS,
    NEW_TOKENS,
    TOLERANCE,
    build_model,
    decode_both,
    greedy_mismatches,
    max_diff,
    model_config,
    prompts,
    recording_greedy,
    smallest_top2_gap,
)
from tests.harness import run_distributed


def _equivalence_fn(rank, world, names: list[str]) -> dict:
    cfg, rows, out = model_config(), prompts(), {}
    for name in names:
        runs = decode_both(build_model(cfg, CONFIGS[name]), rows, NEW_TOKENS)
        out[name] = {
            "mismatches": greedy_mismatches(runs["cached"]["ids"], runs["uncached"]["logits"]),
            "steps": runs["cached"]["logits"].shape[0],
            "diff": max_diff(runs["cached"]["logits"], runs["uncached"]["logits"]),
            "gap": smallest_top2_gap(runs["uncached"]["logits"]),
            "speedup": runs["uncached"]["seconds"] / runs["cached"]["seconds"],
        }
    return out


@pytest.mark.slow  # 256 tokens twice per technique (~10 s each); the quick loop keeps the HF-cache tests
@pytest.mark.parametrize(
    "names", [["baseline", "lcm", "scr"], ["cmr", "sca", "hcma"], ["all five", "all five, other knobs"]]
)
def test_cached_decoding_matches_recomputing_the_sequence(names):
    results = run_distributed(_equivalence_fn, 1, names, timeout=900)[0]
    for name, r in results.items():
        assert r["steps"] == NEW_TOKENS, name
        assert r["diff"] <= TOLERANCE, f"{name}: cached logits differ by {r['diff']:.3g}"
        assert not r["mismatches"], f"{name}: cached tokens are not the uncached greedy choice at {r['mismatches']}"


def _anchors_fn(rank, world) -> dict:
    """The prompt forward of the cached path against the training forward, and each padded row alone."""
    from loom.launch.generate.decode import StageRunner, decode
    from loom.model.inference import InferenceCache

    cfg = model_config()
    stage = build_model(cfg, CONFIGS["all five, other knobs"])
    rows = prompts()
    with torch.no_grad():
        whole = torch.tensor(rows[0])[None]
        train_logits = stage(torch.cat([whole, whole[:, :1]], 1), return_logits=True)
        prefill = stage(whole, cache=InferenceCache(1))
    batched = decode_both(stage, rows, 64)["cached"]
    alone_diff, mismatches = 0.0, []
    for r, row in enumerate(rows):  # each prompt alone, unpadded, following the batch's tokens
        choose, logits = recording_greedy(cfg.vocab_size, EOS, follow=batched["ids"][r : r + 1])
        decode(StageRunner(stage, choose), [row], 64)
        alone = torch.stack(logits)
        alone_diff = max(alone_diff, max_diff(alone[:, 0], batched["logits"][:, r]))
        mismatches += greedy_mismatches(batched["ids"][r : r + 1], alone)
    return {"prefill": max_diff(train_logits, prefill), "alone_diff": alone_diff, "mismatches": mismatches}


def test_the_reference_is_the_training_forward_and_padding_changes_nothing():
    r = run_distributed(_anchors_fn, 1)[0]
    assert r["prefill"] <= TOLERANCE, f"the cached path's prompt forward differs from training's by {r['prefill']}"
    assert r["alone_diff"] <= TOLERANCE, f"a left-padded row differs from the prompt alone by {r['alone_diff']}"
    assert not r["mismatches"], f"the batch's tokens are not the greedy choice of the prompt alone: {r['mismatches']}"


def _mutant_fn(rank, world) -> dict:
    """A ring buffer that keeps K-1 states (the oldest lag reads nothing) must break the equivalence."""
    from loom.techniques.lcm import LCMWindow

    def forgetful(self):
        rows = original(self)
        rows[:, -1] = 0.0  # lag K lost
        return rows

    original = LCMWindow.lagged
    LCMWindow.lagged = forgetful
    try:
        runs = decode_both(build_model(model_config(), CONFIGS["lcm"]), prompts(), 64)
    finally:
        LCMWindow.lagged = original
    return {"diff": max_diff(runs["cached"]["logits"], runs["uncached"]["logits"])}


def test_a_window_of_k_minus_one_states_is_caught():
    assert run_distributed(_mutant_fn, 1)[0]["diff"] > 100 * TOLERANCE


def test_document_metadata_continues_across_calls():
    """Document metadata fed in pieces (a prompt, then single tokens) equals `document_metadata` of the
    whole sequence; left padding shifts nothing of a row's own metadata."""
    from loom.model.inference import InferenceCache
    from loom.techniques.doc_meta import document_metadata

    tokens = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, EOS, 4, 5, 6, 7]]).t()  # [s, 1]
    reference = document_metadata(tokens, EOS)
    cache, pos, start = InferenceCache(1), [], []
    for lo, hi in [(0, 5)] + [(i, i + 1) for i in range(5, 12)]:
        chunk = cache.begin(tokens[lo:hi], None, EOS)
        cache.end()
        pos.append(chunk.pos)
        start.append(chunk.start)
    padded = InferenceCache(1)
    real = torch.tensor([False, False, False] + [True] * 12)[:, None]
    chunk = padded.begin(torch.cat([torch.zeros(3, 1, dtype=torch.long), tokens]), real, EOS)
    assert torch.equal(torch.cat(pos), reference.pos) and torch.equal(torch.cat(start), reference.start)
    assert torch.equal(chunk.pos[3:], reference.pos) and torch.equal(chunk.start[3:], reference.start)
    assert bool(chunk.start[:3].all())  # every padding position is a document of its own
    assert chunk.positions[:, 0].tolist() == [0, 0, 0] + list(range(12))  # padding does not advance RoPE
