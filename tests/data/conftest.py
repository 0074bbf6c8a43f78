"""Tiny generated corpus, tokenizer and shard set shared by the data tests (built once per session)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loom.data.shards import preprocess
from loom.data.tokenizer import train_tokenizer

WORDS = (
    "the a shard token model train epoch rank worker seed sample batch loader stream "
    "resume state pool data text corpus kernel driver memory page cache lock queue"
).split()


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Varied small documents: digits, non-ASCII, blank lines, leading and repeated spaces."""
    rng = random.Random(seed)
    docs = []
    for d in range(count):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
            if rng.random() < 0.3:
                words.append(str(rng.randint(0, 10**6)))
            if rng.random() < 0.2:
                words.append(rng.choice(["café", "naïve", "→", "✓", "日本"]))
            lines.append(rng.choice(["", "  ", "\t"]) + " ".join(words))
        docs.append(f"Doc {d}.\n" + rng.choice(["\n", "\n\n"]).join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(80)


@pytest.fixture(scope="session")
def corpus_file(data_root, documents) -> Path:
    return write_jsonl(data_root / "corpus.jsonl", documents)


@pytest.fixture(scope="session")
def tokenizer_model(data_root, corpus_file) -> Path:
    return train_tokenizer(corpus_file, data_root / "tok" / "tiny", vocab_size=320, num_threads=1)


@pytest.fixture(scope="session")
def shard_dir(data_root, corpus_file, tokenizer_model) -> Path:
    """~600 samples of 16 tokens in ~30 shards of 20 samples."""
    out = data_root / "shards"
    preprocess(corpus_file, tokenizer_model, out, seq_length=15, samples_per_shard=20, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def small_shards(data_root, documents, tokenizer_model) -> Path:
    """~220 samples of 16 tokens in ~22 shards of 10: several epochs stay cheap for the loader tests."""
    source = write_jsonl(data_root / "small.jsonl", documents[:24])
    out = data_root / "small_shards"
    preprocess(source, tokenizer_model, out, seq_length=15, samples_per_shard=10, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def other_shards(data_root, tokenizer_model) -> Path:
    """A second shard set for mixtures (other documents, same tokenizer and seq_length): ~310 samples
    in ~39 shards of 8."""
    source = write_jsonl(data_root / "other.jsonl", make_documents(40, seed=7))
    out = data_root / "other_shards"
    preprocess(source, tokenizer_model, out, seq_length=15, samples_per_shard=8, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def third_shards(data_root, tokenizer_model) -> Path:
    """A small third shard set (~120 samples in ~20 shards of 6): it runs out first in a mixture."""
    source = write_jsonl(data_root / "third.jsonl", make_documents(14, seed=9))
    out = data_root / "third_shards"
    preprocess(source, tokenizer_model, out, seq_length=15, samples_per_shard=6, num_workers=1, progress=False)
    return out
