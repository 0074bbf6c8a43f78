"""Data settings of a run (an OmegaConf structured config: plain field types only)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

from loom.data.corpora import CORPORA
from loom.data.tokenizer import MODEL_TYPES

ON_CORRUPT = ("skip", "fail")
"""Policies for a corrupt training shard (kept here so importing the config stays light: no torch)."""

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SPLIT_FOLDERS = ("train", "val", "manifest.json")


@dataclass
class MixtureSource:
    """One entry of `data.mixture` or `data.eval_mixture`."""

    path: str = ""
    """A built-in corpus name (`loom data list`), or shards as `train_data` accepts them (manifest, folder, URL)."""
    weight: float = 1.0
    """Relative share of the samples drawn from this source (normalised over the list); 0 leaves it unread."""
    name: Optional[str] = None
    """Name in logs and TensorBoard tags (`data/<name>/tokens`); None derives it from the corpus or folder name."""
    shard_base: Optional[str] = None
    """Prefix that replaces this source's manifest folder in shard URLs (as `data.shard_base` does)."""

    def is_corpus(self) -> bool:
        """A bare built-in corpus name; write `./linuxdoc` for a folder of that name."""
        return self.path in CORPORA

    def display_name(self) -> str:
        """`name`, or the corpus name, or the last folder of the path that is not a split folder."""
        if self.name:
            return self.name
        if self.is_corpus():
            return self.path
        parts = [p for p in re.split(r"[/\\\s]+", self.path.rstrip("/")) if p and p not in _SPLIT_FOLDERS]
        tail = parts[-1] if parts else "source"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", tail.removesuffix(".json")) or "source"


def _mixture_problems(key: str, entries: list[MixtureSource]) -> list[str]:
    problems = []
    for index, entry in enumerate(entries):
        where = f"data.{key}[{index}]"
        if not entry.path:
            problems.append(f"{where}: path is empty (give a built-in corpus name or a manifest, folder or URL)")
        elif entry.path.startswith(("http://", "https://")) and entry.path.endswith("/"):
            problems.append(f"{where}: {entry.path!r} ends with '/': name the manifest itself")
        if not (math.isfinite(entry.weight) and entry.weight >= 0):
            problems.append(f"{where}: weight must be a finite number >= 0, got {entry.weight}")
        if entry.name is not None and not _SOURCE_NAME.match(entry.name):
            problems.append(f"{where}: name {entry.name!r} must be letters, digits and _ . + - (it becomes a tag)")
    if entries and not any(e.weight > 0 for e in entries if math.isfinite(e.weight)):
        problems.append(f"data.{key}: no source has a positive weight; at least one needs one")
    names = [e.display_name() for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"data.{key}: several sources are named {', '.join(duplicates)}; give each a distinct `name`")
    return problems


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
    mixture: List[MixtureSource] = field(default_factory=list)
    """Train on a weighted blend of sources `{path, weight, name, shard_base}` (README: "Data mixtures")."""
    eval_mixture: List[MixtureSource] = field(default_factory=list)
    """Several held-out sets `{path, weight, name}`: `eval/<name>/loss` each, `eval/loss` their weighted mean."""

    def validate(self) -> list[str]:
        """Human-readable problems with these settings; empty when they are usable."""
        problems = []
        if self.mixture and self.train_data is not None:
            problems.append("data.mixture and data.train_data are both set: train on one or the other")
        if self.eval_mixture and self.eval_data is not None:
            problems.append("data.eval_mixture and data.eval_data are both set: evaluate on one or the other")
        if self.mixture and self.shard_base is not None:
            problems.append("data.shard_base applies to train_data; give each data.mixture entry its own shard_base")
        problems += _mixture_problems("mixture", self.mixture) + _mixture_problems("eval_mixture", self.eval_mixture)
        if self.train_data is None and not self.mixture and self.corpus not in CORPORA:
            problems.append(f"data.corpus {self.corpus!r} is not a built-in corpus ({', '.join(sorted(CORPORA))})")
        eval_corpus_used = self.eval_data is None and not self.eval_mixture and self.eval_corpus is not None
        if eval_corpus_used and self.eval_corpus not in CORPORA:
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
