"""Reference points a user can hold a loss against: the unigram model of the training shards."""

from __future__ import annotations

import math

import numpy as np

from loom.data.manifest import load_manifest, shard_urls
from loom.data.shard_reader import read_shard


def token_counts(manifest_path: str, vocab_size: int, split: str = "train") -> np.ndarray:
    manifest = load_manifest(manifest_path, split=split)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for url, info in zip(shard_urls(manifest), manifest.shards):
        samples = read_shard(url, info, manifest)
        counts += np.bincount(samples[:, 1:].reshape(-1), minlength=vocab_size)[:vocab_size]
    return counts


def unigram_cross_entropy(train_manifest: str, eval_manifest: str, vocab_size: int) -> float:
    """Nats per token of the held-out targets under the training unigram distribution (add-one
    smoothing): the loss a model that ignores context entirely would reach."""
    train = token_counts(train_manifest, vocab_size) + 1
    held_out = token_counts(eval_manifest, vocab_size, split="val")
    log_p = np.log(train) - math.log(train.sum())
    return float(-(held_out * log_p).sum() / max(held_out.sum(), 1))
