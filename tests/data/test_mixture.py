"""Data mixtures: shares follow the weights, exact resume, each source read as alone, corrupt shards,
zero weights and single sources equal to the plain loader, changed weights on resume, refusals."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from loom.data.config import MixtureSource
from loom.data.loader import build_train_loader
from loom.data.mixture import build_mixture_loader, pick_source
from loom.data.shard_reader import CorruptShardError
from loom.data.shards import preprocess
from loom.data.tokenizer import train_tokenizer
from tests.data.test_loader import all_samples, key, take
from tests.data.test_loader_errors import damaged_copy


def mixture(*pairs, **kwargs):
    """A mixture loader over (folder, weight) pairs."""
    return build_mixture_loader([MixtureSource(str(folder), weight=w) for folder, w in pairs], **kwargs)


def owners(*folders) -> dict[bytes, int]:
    """Which source each sample comes from (the test sets share no sample)."""
    table: dict[bytes, int] = {}
    for index, folder in enumerate(folders):
        for sample in all_samples(folder):
            assert table.setdefault(sample, index) == index, "test sources must not share samples"
    return table


def rows(batches) -> list[bytes]:
    return [key(row) for batch in batches for row in batch]


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, 2.0, 4.0), (0.05, 0.9, 0.05, 0.0)])
def test_the_interleave_stays_within_two_samples_of_every_target(weights):
    shares = [w / sum(weights) for w in weights]
    counts = [0] * len(weights)
    for drawn in range(1, 10_001):
        counts[pick_source(shares, counts)] += 1
        assert max(abs(c - s * drawn) for c, s in zip(counts, shares)) < 2, (drawn, counts)
    assert counts[-1] == 0 or shares[-1] > 0  # a zero weight is never drawn


def test_realised_token_shares_match_the_weights_after_10k_samples(small_shards, other_shards, third_shards):
    weights = (0.5, 0.3, 0.2)
    folders = (small_shards, other_shards, third_shards)
    loader = mixture(*zip(folders, weights), micro_batch_size=10, num_workers=2, seed=7)
    table = owners(*folders)
    drawn = Counter(table[k] for k in rows(take(loader, 1000)))
    scalars = loader.source_scalars()
    loader.close()
    assert sum(drawn.values()) == 10_000
    for index, weight in enumerate(weights):
        assert abs(drawn[index] / 10_000 - weight) <= 0.01 * weight, (index, drawn)
    names = [MixtureSource(str(f)).display_name() for f in folders]
    assert [scalars[f"data/{n}/tokens"] for n in names] == [drawn[i] * 15 for i in range(3)]
    assert scalars[f"data/{names[2]}/epoch"] >= 1 and scalars[f"data/{names[1]}/epoch"] >= 1  # both ran out


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_mixture_resume_yields_exactly_the_uninterrupted_batches(
    small_shards, other_shards, third_shards, dp_size, num_workers
):
    pairs = ((small_shards, 1.0), (other_shards, 1.0), (third_shards, 2.0))  # the third set runs out first
    for rank in range(dp_size):

        def build():
            return mixture(
                *pairs,
                micro_batch_size=6,
                dp_rank=rank,
                dp_size=dp_size,
                num_workers=num_workers,
                seed=11,
                shards_per_pool=2,
            )

        reference = build()
        full = take(reference, 60)
        epochs = reference.source_scalars()
        reference.close()
        assert epochs[f"data/{MixtureSource(str(third_shards)).display_name()}/epoch"] >= 1
        first = build()
        head = take(first, 23)
        first.close()
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON data
        resumed = build()
        resumed.load_state_dict(state)
        tail = take(resumed, 37)
        resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(full, head + tail)), (rank, dp_size, num_workers)
        assert len(json.dumps(state)) < 8192


def test_each_source_is_read_as_the_plain_loader_reads_it(small_shards, other_shards, third_shards):
    """A source that runs out starts its next epoch on its own; the blend only interleaves."""
    folders = (small_shards, other_shards, third_shards)
    loader = mixture(*zip(folders, (1.0, 1.0, 3.0)), micro_batch_size=1, num_workers=0, seed=5)
    blended = rows(take(loader, 700))
    loader.close()
    table = owners(*folders)
    for index, folder in enumerate(folders):
        mine = [k for k in blended if table[k] == index]
        alone = build_train_loader(folder, micro_batch_size=1, num_workers=0, seed=5)
        assert mine == rows(take(alone, len(mine))), folder.name


@pytest.mark.parametrize("dp_rank,dp_size,num_workers", [(0, 1, 0), (1, 2, 2)])
def test_zero_weights_and_a_single_source_equal_the_plain_loader(
    small_shards, other_shards, dp_rank, dp_size, num_workers
):
    layout = dict(micro_batch_size=4, dp_rank=dp_rank, dp_size=dp_size, num_workers=num_workers, seed=3)
    plain = build_train_loader(small_shards, **layout)
    want = take(plain, 80)  # > 1 epoch
    plain.close()
    for pairs in [
        ((small_shards, 1.0),),
        ((other_shards, 0.0), (small_shards, 2.5)),
        ((small_shards, 1.0), (other_shards, 0.0)),
    ]:
        loader = mixture(*pairs, **layout)
        got = take(loader, 80)
        assert loader.epoch >= 1 and loader.source_scalars()  # a zero-weight source never holds the epoch back
        loader.close()
        assert all(torch.equal(a, b) for a, b in zip(want, got)), pairs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_changed_weights_on_resume_continue_every_source_and_say_so(small_shards, other_shards, num_workers, caplog):
    folders = (small_shards, other_shards)
    table = owners(*folders)

    def build(weights):
        return mixture(*zip(folders, weights), micro_batch_size=4, num_workers=num_workers, seed=2)

    first = build((1.0, 1.0))
    head = rows(take(first, 30))
    state = first.state_dict()
    tokens_before = first.source_scalars()
    first.close()
    resumed = build((3.0, 1.0))
    with caplog.at_level(logging.WARNING, logger="loom.data"):
        resumed.load_state_dict(json.loads(json.dumps(state)))
    assert "weights changed since the checkpoint" in caplog.text and "0.75" in caplog.text
    assert resumed.source_scalars() == tokens_before  # the cumulative counts carry on
    new = rows(take(resumed, 100))
    later = resumed.state_dict()
    after = rows(take(resumed, 50))
    resumed.close()
    drawn = Counter(table[k] for k in new)
    assert abs(drawn[0] - 0.75 * 400) <= 2  # the interleave restarted: the new weights hold from here on
    if num_workers == 0:  # every source continues exactly where it was
        for index, folder in enumerate(folders):
            mine = [k for k in head + new if table[k] == index]
            alone = build_train_loader(folder, micro_batch_size=1, num_workers=0, seed=2)
            assert mine == rows(take(alone, len(mine)))
    again = build((3.0, 1.0))
    again.load_state_dict(later)  # same weights now: no second restart, the stream continues exactly
    assert rows(take(again, 50)) == after
    again.close()


@pytest.mark.parametrize("policy,num_workers", [("fail", 0), ("fail", 2), ("skip", 0), ("skip", 2)])
def test_a_corrupt_shard_in_one_source(tmp_path, small_shards, other_shards, policy, num_workers):
    folder, name, lost = damaged_copy(other_shards, tmp_path / "other", "truncated")
    loader = mixture(
        (small_shards, 1.0), (folder, 1.0), micro_batch_size=1, num_workers=num_workers, seed=4, on_corrupt=policy
    )
    if policy == "fail":
        with pytest.raises(CorruptShardError, match=f"corrupt shard {name}"):
            take(loader, 700)
        loader.close()
        return
    blended = rows(take(loader, 700))  # > one epoch of the damaged source on every stream
    assert loader.corrupt_shards_skipped >= 1 and not set(blended) & set(lost)
    loader.close()
    if num_workers == 0:  # the healthy source is undisturbed, the damaged one reads as it would alone
        table = owners(small_shards, other_shards)
        for index, source in enumerate((small_shards, folder)):
            mine = [k for k in blended if table[k] == index]
            alone = build_train_loader(source, micro_batch_size=1, num_workers=0, seed=4, on_corrupt="skip")
            assert mine == rows(take(alone, len(mine)))


def test_mismatched_or_invalid_sources_are_refused(tmp_path, small_shards, other_shards, corpus_file, tokenizer_model):
    other_tok = train_tokenizer(corpus_file, tmp_path / "tok", vocab_size=340, num_threads=1)
    preprocess(corpus_file, other_tok, tmp_path / "retok", seq_length=15, samples_per_shard=20, progress=False)
    preprocess(corpus_file, tokenizer_model, tmp_path / "long", seq_length=31, samples_per_shard=20, progress=False)
    with pytest.raises(ValueError, match="tokenized with different tokenizers"):
        mixture((small_shards, 1.0), (tmp_path / "retok", 1.0), micro_batch_size=2)
    with pytest.raises(ValueError, match="different lengths"):
        mixture((small_shards, 1.0), (tmp_path / "long", 1.0), micro_batch_size=2)
    with pytest.raises(ValueError, match="different lengths|seq_length=31"):
        mixture((small_shards, 1.0), (tmp_path / "long", 1.0), micro_batch_size=2, seq_length=15)
    with pytest.raises(ValueError, match="names must differ"):
        mixture((small_shards, 1.0), (small_shards, 1.0), micro_batch_size=2)
    with pytest.raises(ValueError, match="weights must be >= 0 with one > 0"):
        mixture((small_shards, 0.0), (other_shards, 0.0), micro_batch_size=2)
    with pytest.raises(ValueError, match="source 'small_shards'.*cannot feed 2 DP ranks x 16 workers"):
        mixture((small_shards, 1.0), micro_batch_size=2, dp_size=2, num_workers=16)
    mixture((other_shards, 1.0), (small_shards, 0.0), micro_batch_size=2, dp_size=2, num_workers=16)  # unread
    loader = mixture((small_shards, 1.0), (other_shards, 1.0), micro_batch_size=2, num_workers=0)
    take(loader, 3)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="the shard set"):
        mixture((small_shards, 1.0), micro_batch_size=2, num_workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers changed"):
        mixture((small_shards, 1.0), (other_shards, 1.0), micro_batch_size=2, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="the shard set"):  # a plain loader's state is not a mixture's
        build_train_loader(small_shards, 2, num_workers=0).load_state_dict(state)
