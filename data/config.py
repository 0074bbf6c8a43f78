"""Data settings of a run (an OmegaConf structured config: plain field types only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from loom.data.corpora import CORPORA
from loom.data.tokenizer import MODEL_TYPES

ON_CORRUPT = ("skip", "fail")
"""Policies for a corrupt training shard (kept here so importing the config stays light: no torch)."""


@dataclass
class DataConfig:
    corpus: str = "linuxdoc"
    """Built-in corpus (`loom data list`) prepared when `train_data` is not set."""
    train_data: Optional[str] = None
    """Training shards: a manifest.json, the folder holding it, or an http(s)/pipe: URL of a manifest."""
    eval_data: Optional[str] = None
    """Held-out shards for evaluation (same forms as `train_data`); None means no held-out eval."""
    eval_corpus: Optional[str] = "pydoc"
    """Built-in corpus prepared as held-out eval data when `eval_data` is not set; None disables it."""
    tokenizer: Optional[str] = None
    """SentencePiece .model file; None uses the tokenizer.model stored next to the training shards."""
    cache_dir: Optional[str] = None
    """Where built-in corpora are kept; None means $LOOM_CACHE/corpora or ~/.cache/loom/corpora."""
    tokenizer_type: str = "bpe"
    """SentencePiece model type when a tokenizer is trained: "bpe" (default, exports to HF) or "unigram"."""
    samples_per_shard: int = 256
    """Samples (seq_length + 1 tokens each) per .tar shard written by preprocessing."""
    val_percent: float = 0.0
    """Percent of documents (chosen by crc32 of their text) held out into val/ when preprocessing."""
    preprocess_workers: Optional[int] = None
    """Tokenizer processes used by preprocessing; None means one per CPU core."""
    num_workers: int = 1
    """DataLoader worker processes per rank; resuming requires the same number."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead."""
    seed: int = 1234
    """Seed of the shard order and in-pool sample permutations (mixed with epoch, rank and worker)."""
    shards_per_pool: int = 4
    """Consecutive shards of a stream whose samples are permuted together (memory: this many shards per worker)."""
    on_corrupt: str = "fail"
    """What a corrupt or unreadable training shard does: "fail" stops the run, "skip" logs, skips and counts it."""
    shard_base: Optional[str] = None
    """Prefix that replaces the manifest's folder in shard URLs, e.g. "pipe:curl -sf https://host/set/"."""
    eval_max_batches: Optional[int] = 50
    """Micro-batches per rank in one evaluation; None means a full pass over the eval shards."""

    def validate(self) -> list[str]:
        """Human-readable problems with these settings; empty when they are usable."""
        problems = []
        if self.train_data is None and self.corpus not in CORPORA:
            problems.append(f"data.corpus {self.corpus!r} is not a built-in corpus ({', '.join(sorted(CORPORA))})")
        if self.eval_data is None and self.eval_corpus is not None and self.eval_corpus not in CORPORA:
            problems.append(
                f"data.eval_corpus {self.eval_corpus!r} is not a built-in corpus ({', '.join(sorted(CORPORA))})"
            )
        if self.tokenizer_type not in MODEL_TYPES:
            problems.append(f"data.tokenizer_type must be one of {MODEL_TYPES}, got {self.tokenizer_type!r}")
        if self.samples_per_shard < 1:
            problems.append(f"data.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 0.0 <= self.val_percent < 100.0:
            problems.append(f"data.val_percent must be in [0, 100), got {self.val_percent}")
        if self.preprocess_workers is not None and self.preprocess_workers < 1:
            problems.append(f"data.preprocess_workers must be >= 1 or null, got {self.preprocess_workers}")
        if self.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            problems.append(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.shards_per_pool < 1:
            problems.append(f"data.shards_per_pool must be >= 1, got {self.shards_per_pool}")
        if self.on_corrupt not in ON_CORRUPT:
            problems.append(f"data.on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            problems.append(f"data.eval_max_batches must be >= 1 or null, got {self.eval_max_batches}")
        for name in ("train_data", "eval_data"):
            value = getattr(self, name)
            if value is not None and value.startswith(("http://", "https://")) and value.endswith("/"):
                problems.append(f"data.{name} {value!r} ends with '/': name the manifest itself")
        return problems
