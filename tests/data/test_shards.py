"""Packing text into shards: exact token stream, byte-identical output, manifest, validation split."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from loom.data.eval_loader import eval_batches
from loom.data.manifest import load_manifest
from loom.data.shards import in_validation_split, preprocess, token_dtype
from loom.data.tokenizer import Tokenizer
from tests.data.conftest import write_jsonl


def _stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [t for doc in docs for t in tok.encode(doc, eos=True)]


def test_manifest_describes_the_shards(shard_dir, tokenizer_model, documents):
    m = load_manifest(shard_dir)
    tok = Tokenizer(tokenizer_model)
    assert (m.seq_length, m.sample_length, m.dtype, m.vocab_size, m.eos_id) == (15, 16, "uint16", 320, 3)
    assert m.tokenizer_sha256 == tok.sha256 == Tokenizer(shard_dir / "tokenizer.model").sha256
    assert m.num_documents == len(documents) and m.split == "all"
    assert m.num_samples == sum(s.nsamples for s in m.shards) and m.num_tokens == m.num_samples * 16
    assert m.num_tokens + m.dropped_tokens == len(_stream(tok, documents)) and m.dropped_tokens < 16
    assert all(s.nsamples == 20 for s in m.shards[:-1]) and 0 < m.shards[-1].nsamples <= 20
    with tarfile.open(shard_dir / m.shards[0].name) as tar:
        names = tar.getnames()
        assert names[:2] == ["s000000_000000.tokens.u16", "s000000_000001.tokens.u16"]
        assert all(t.mtime == 0 for t in tar.getmembers())
        assert len(tar.extractfile(names[0]).read()) == 16 * 2


def test_round_trip_text_to_tokens_to_shards_and_back(shard_dir, tokenizer_model, documents):
    tok = Tokenizer(tokenizer_model)
    stream = _stream(tok, documents)
    got = [t for batch in eval_batches(shard_dir, micro_batch_size=7) for t in batch.flatten().tolist()]
    assert got == stream[: len(got)] and len(got) == load_manifest(shard_dir).num_tokens
    ends = [i for i, t in enumerate(got) if t == tok.eos_id]  # EOS marks every document boundary
    starts = [0] + [e + 1 for e in ends[:-1]]
    assert [tok.decode(got[s:e]) for s, e in zip(starts, ends)] == documents[: len(ends)]
    assert len(ends) >= len(documents) - 2


def test_same_input_gives_byte_identical_shards_for_any_worker_count(tmp_path, corpus_file, tokenizer_model):
    preprocess(
        corpus_file, tokenizer_model, tmp_path / "a", seq_length=15, samples_per_shard=20, num_workers=1, progress=False
    )
    preprocess(
        corpus_file, tokenizer_model, tmp_path / "b", seq_length=15, samples_per_shard=20, num_workers=2, progress=False
    )
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # a re-run into the same folder replaces the old set instead of leaving stale shards behind
    preprocess(
        corpus_file, tokenizer_model, tmp_path / "a", seq_length=31, samples_per_shard=40, num_workers=1, progress=False
    )
    m = load_manifest(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar")) == [s.name for s in m.shards]


def test_validation_split_is_deterministic_by_document_hash(tmp_path, corpus_file, tokenizer_model, documents):
    out = preprocess(
        corpus_file,
        tokenizer_model,
        tmp_path / "s",
        seq_length=7,
        samples_per_shard=50,
        num_workers=2,
        val_percent=25,
        progress=False,
    )
    assert set(out) == {"train", "val"}
    train, val = load_manifest(out["train"]), load_manifest(out["val"])
    is_val = [in_validation_split(d, 25) for d in documents]
    assert 0 < sum(is_val) < len(documents)
    assert (train.num_documents, val.num_documents) == (is_val.count(False), is_val.count(True))
    assert (train.split, val.split) == ("train", "val")
    assert (tmp_path / "s" / "val" / "tokenizer.model").is_file()
    tok = Tokenizer(tokenizer_model)
    val_stream = _stream(tok, [d for d, v in zip(documents, is_val) if v])
    got = [t for b in eval_batches(tmp_path / "s", micro_batch_size=4) for t in b.flatten().tolist()]
    assert got == val_stream[: len(got)]  # a folder with train/ and val/ resolves to val/ for eval


def test_token_dtype_grows_with_the_vocabulary():
    assert token_dtype(320) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


def test_preprocess_errors_are_clear(tmp_path, tokenizer_model, corpus_file):
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no documents found"):
        preprocess(tmp_path / "empty.jsonl", tokenizer_model, tmp_path / "o", seq_length=15, progress=False)
    write_jsonl(tmp_path / "short.jsonl", ["hi"])
    with pytest.raises(ValueError, match="fewer than one sample"):
        preprocess(tmp_path / "short.jsonl", tokenizer_model, tmp_path / "o", seq_length=15, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        preprocess(tmp_path / "nothing.jsonl", tokenizer_model, tmp_path / "o", seq_length=15, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        preprocess(corpus_file, tmp_path / "none.model", tmp_path / "o", seq_length=15, progress=False)
    with pytest.raises(ValueError, match="val_percent"):
        preprocess(corpus_file, tokenizer_model, tmp_path / "o", seq_length=15, val_percent=100, progress=False)


def test_large_vocabularies_are_stored_as_uint32(tmp_path, tokenizer_model):
    from loom.data.shards import _ShardPacker

    class WideTokenizer:  # stands in for a 70k-vocab model, whose training would take minutes
        path, vocab_size, eos_id, sha256 = tokenizer_model, 70000, 3, "f" * 64

    packer = _ShardPacker(tmp_path, "all", WideTokenizer(), seq_length=3, samples_per_shard=2)
    ids = np.arange(65530, 65530 + 20, dtype=token_dtype(70000))
    packer.add(ids)
    m = packer.finish()
    assert (m.dtype, m.sample_key, m.num_samples, len(m.shards)) == ("uint32", "tokens.u32", 5, 3)
    got = torch.cat(list(eval_batches(tmp_path, micro_batch_size=2))).flatten().tolist()
    assert got == ids.tolist()
