"""Corrupt shards under both policies, incompatible shard sets, and refused resumes."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter

import pytest

from loom.data.loader import build_train_loader
from loom.data.manifest import Manifest, check_compatible, load_manifest
from loom.data.shard_reader import CorruptShardError
from loom.data.shards import preprocess
from loom.data.tokenizer import Tokenizer, train_tokenizer
from tests.data.conftest import write_jsonl
from tests.data.test_loader import all_samples, key, take


def damaged_copy(src, dst, how: str):
    """Copy the shard set and damage shard 3; returns (folder, damaged shard name, its sample keys)."""
    shutil.copytree(src, dst)
    m = load_manifest(dst)
    name = m.shards[3].name
    path = dst / name
    lost = all_samples(src) - all_samples_without(src, name)
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 4 + 100]))  # mid-member: tar end padding is half the file
    elif how == "random bytes":
        middle = len(data) // 2
        data[middle : middle + 700] = bytes((i * 37 + 11) % 256 for i in range(700))
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    return dst, name, lost


def all_samples_without(shard_dir, name) -> Counter:
    from loom.data.shard_reader import read_shard

    m = load_manifest(shard_dir)
    return Counter(
        row.tobytes() for s in m.shards if s.name != name for row in read_shard(str(shard_dir / s.name), s, m)
    )


@pytest.mark.parametrize("how,num_workers", [("truncated", 0), ("random bytes", 0), ("truncated", 2), ("missing", 0)])
def test_corrupt_shard_fails_the_run_naming_the_shard(tmp_path, small_shards, how, num_workers):
    folder, name, _ = damaged_copy(small_shards, tmp_path / "s", how)
    loader = build_train_loader(folder, micro_batch_size=4, num_workers=num_workers, on_corrupt="fail")
    with pytest.raises(CorruptShardError, match=f"corrupt shard {name}"):
        take(loader, 100)
    with pytest.raises(RuntimeError, match="stopped after an error: CorruptShardError"):
        next(loader)  # a failed stream never silently restarts from the beginning
    loader.close()


@pytest.mark.parametrize("how,num_workers", [("truncated", 2), ("random bytes", 0)])
def test_corrupt_shard_is_skipped_and_counted(tmp_path, small_shards, how, num_workers, caplog):
    folder, name, lost = damaged_copy(small_shards, tmp_path / "s", how)
    good = all_samples(small_shards) - lost
    loader = build_train_loader(folder, micro_batch_size=1, num_workers=num_workers, on_corrupt="skip")
    assert loader.corrupt_shards_skipped == 0
    with caplog.at_level(logging.WARNING, logger="loom.data"):
        workers = max(1, num_workers)
        streams = [loader.dataset.stream_shards(0, w, workers) for w in range(workers)]
        m = load_manifest(folder)
        counts = [sum(m.shards[i].nsamples for i in s if m.shards[i].name != name) for s in streams]
        per_worker = [[] for _ in range(workers)]
        step = 0
        while any(len(per_worker[w]) < counts[w] for w in range(workers)):
            per_worker[step % workers].append(key(next(loader)[0]))
            step += 1
    seen = Counter(k for w in range(workers) for k in per_worker[w][: counts[w]])
    assert seen == good and not set(seen) & set(lost)
    assert loader.corrupt_shards_skipped == 1
    assert [s["corrupt_shards"] for s in loader.stream_states() if s["corrupt_shards"]] == [[name]]
    if num_workers == 0:  # worker processes log to their own stderr
        assert name in caplog.text
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()
    resumed = build_train_loader(folder, micro_batch_size=1, num_workers=num_workers, on_corrupt="skip")
    resumed.load_state_dict(state)
    assert resumed.corrupt_shards_skipped == 1  # the counter survives a checkpoint


def test_count_is_checked_when_the_manifest_has_no_hashes(tmp_path, small_shards):
    folder, name, _ = damaged_copy(small_shards, tmp_path / "s", "truncated")
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        shard["sha256"] = ""
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loader = build_train_loader(folder, micro_batch_size=4, num_workers=0)
    with pytest.raises(CorruptShardError, match=name):
        take(loader, 100)


def test_incompatible_shards_give_clear_errors(tmp_path, small_shards, tokenizer_model, corpus_file):
    tok = Tokenizer(tokenizer_model)
    build_train_loader(small_shards, 2, tokenizer_sha256=tok.sha256, vocab_size=320, seq_length=15)
    build_train_loader(small_shards, 2, vocab_size=384, vocab_padding_multiple=128)  # a padded embedding is fine
    with pytest.raises(ValueError, match="model vocab_size=1000 does not match the tokenizer's vocabulary of 320"):
        build_train_loader(small_shards, 2, vocab_size=1000)
    other = Tokenizer(train_tokenizer(corpus_file, tmp_path / "other", vocab_size=340, num_threads=1))
    with pytest.raises(ValueError, match="different tokenizer"):
        build_train_loader(small_shards, 2, tokenizer_sha256=other.sha256)
    with pytest.raises(ValueError, match="seq_length=15 .* asks for seq_length=31"):
        build_train_loader(small_shards, 2, seq_length=31)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        build_train_loader(tmp_path, 2)
    with pytest.raises(ValueError, match="shards cannot feed 2 DP ranks x 16 workers"):
        build_train_loader(small_shards, 2, dp_rank=0, dp_size=2, num_workers=16)
    with pytest.raises(ValueError, match="on_corrupt"):
        build_train_loader(small_shards, 2, on_corrupt="ignore")
    with pytest.raises(ValueError, match="empty"):
        check_compatible(Manifest(15, "uint16", 320, 3, tok.sha256, "tokenizer.model", 0, 0, 0, 0, "all"))
    write_jsonl(tmp_path / "short.jsonl", ["too short"])
    with pytest.raises(ValueError):
        preprocess(tmp_path / "short.jsonl", tokenizer_model, tmp_path / "short", seq_length=15, progress=False)
    with pytest.raises(ValueError, match="empty"):  # the 0-sample manifest left behind is refused too
        build_train_loader(tmp_path / "short", 2)


def test_resume_into_a_different_layout_is_refused(small_shards, tmp_path, corpus_file, tokenizer_model):
    loader = build_train_loader(small_shards, 4, num_workers=2, seed=1)
    take(loader, 5)
    state = loader.state_dict()
    loader.close()
    for change, match in [
        (dict(num_workers=1), "num_workers changed"),
        (dict(dp_size=2), "dp_size changed"),
        (dict(seed=2), "seed changed"),
        (dict(micro_batch_size=8), "micro_batch_size changed"),
    ]:
        kwargs = dict(micro_batch_size=4, num_workers=2, seed=1) | change
        with pytest.raises(ValueError, match=match):
            build_train_loader(small_shards, **kwargs).load_state_dict(state)
    preprocess(
        corpus_file,
        tokenizer_model,
        tmp_path / "other",
        seq_length=15,
        samples_per_shard=10,
        num_workers=1,
        progress=False,
    )
    with pytest.raises(ValueError, match="the shard set"):
        build_train_loader(tmp_path / "other", 4, num_workers=2, seed=1).load_state_dict(state)
