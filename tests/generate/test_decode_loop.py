"""The decoding loop and the samplers on their own (a scripted stand-in for the model): left padding,
stopping at EOS, the context window, and what top-k / top-p / the seed do."""

from __future__ import annotations

import pytest
import torch

from loom.launch.generate.decode import decode, left_padded
from loom.launch.generate.sampling import Sampling, filtered_logits, sampler
from loom.model.inference import InferenceCache


class ScriptedRunner:
    """Records what `decode` feeds it; the next id is the row's real-token count so far, plus 10."""

    def __init__(self):
        self.calls: list[tuple[list[list[int]], bool]] = []
        self.cache = None
        self.resets = 0

    def reset(self, batch: int, reserve: int = 0) -> None:
        self.cache, self.resets, self.seen = InferenceCache(batch, reserve), self.resets + 1, None

    def __call__(self, ids: torch.Tensor, real=None) -> torch.Tensor:
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
        self.calls.append((ids.tolist(), real is not None and not bool(real.all())))
        self.cache.length += ids.shape[1]
        self.seen = real.sum(1) if self.seen is None else self.seen + real.sum(1)
        return (self.seen + 10).double()[:, None]


def test_prompts_are_left_padded_and_then_fed_one_token_at_a_time():
    runner = ScriptedRunner()
    out = decode(runner, [[5, 6, 7], [8]], 4)
    assert runner.calls[0] == ([[5, 6, 7], [0, 0, 8]], True)
    assert [c[0] for c in runner.calls[1:]] == [[[13], [11]], [[14], [12]], [[15], [13]]]
    assert out.ids == [[13, 14, 15, 16], [11, 12, 13, 14]] and runner.resets == 1
    ids, real = left_padded([[1], [2, 3]])
    assert ids.tolist() == [[0, 1], [2, 3]] and real.tolist() == [[False, True], [True, True]]
    with pytest.raises(ValueError, match="at least one token"):
        left_padded([[1], []])


def test_rows_stop_at_eos_and_the_batch_when_all_have():
    runner = ScriptedRunner()
    out = decode(runner, [[1, 2], [3]], 10, eos_id=13)  # row 0 emits 12, 13; row 1 emits 11, 12, 13
    assert out.ids == [[12, 13], [11, 12, 13]]
    assert out.new_tokens == 5 and len(runner.calls) == 3


def test_past_the_context_every_step_rereads_the_window_and_without_cache_the_sequence():
    runner = ScriptedRunner()
    decode(runner, [[1, 2, 3]], 4, context=4)
    # the window restarts the count (the runner's next id is 10 + the real tokens it has seen)
    assert [c[0] for c in runner.calls] == [[[1, 2, 3]], [[13]], [[2, 3, 13, 14]], [[3, 13, 14, 14]]]
    assert runner.resets == 3
    runner = ScriptedRunner()
    decode(runner, [[1, 2, 3]], 3, use_cache=False)
    assert [c[0] for c in runner.calls] == [[[1, 2, 3]], [[1, 2, 3, 13]], [[1, 2, 3, 13, 14]]]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda z: torch.isfinite(z)[0].tolist()  # noqa: E731
    assert kept(filtered_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filtered_logits(logits, top_p=0.5)) == [True, False, False, False]  # 0.5 reached by the first
    assert kept(filtered_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filtered_logits(logits, top_p=0.8)) == [True, True, True, False]
    assert kept(filtered_logits(logits, top_p=0.01)) == [True, False, False, False]  # the best always stays


def test_sampling_follows_the_seed_and_greedy_is_the_arg_max():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    padded = torch.cat([logits, torch.full((4, 14), -1e30)], dim=1)  # TP padding columns are cut
    draws = lambda seed: torch.cat([sampler(Sampling(1.0, seed=seed), 50)(padded) for _ in range(20)])  # noqa: E731
    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), draws(2))
    assert draws(3).max() < 50
    assert torch.equal(sampler(Sampling(), 50)(padded)[:, 0].long(), logits.argmax(-1))
    assert torch.equal(sampler(Sampling(0.7, top_k=1), 50)(padded)[:, 0].long(), logits.argmax(-1))
    assert Sampling(-1.0, top_k=-1, top_p=0.0).problems() == [
        "--temperature must be >= 0, got -1.0",
        "--top-k must be >= 0, got -1",
        "--top-p must be in (0, 1], got 0.0",
    ]
