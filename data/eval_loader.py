"""Held-out evaluation batches: one deterministic pass over a shard set, split evenly by DP rank."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from loom.data.manifest import Manifest, check_compatible, load_manifest, shard_urls
from loom.data.shard_reader import read_shard


def eval_batches(
    source: str | os.PathLike,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int | None = None,
    *,
    shard_base: str | None = None,
    seq_length: int | None = None,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    vocab_padding_multiple: int = 1,
) -> Iterator[torch.Tensor]:
    """One deterministic pass, no shuffle: rank r gets samples [r*n, (r+1)*n) with n = total // dp_size.

    Every rank yields the same number of batches of the same shapes (the last may be smaller than
    `micro_batch_size`), so collectives in the eval loop stay in step. A corrupt shard always
    raises CorruptShardError: skipping would leave the ranks with different batch counts.
    Bad arguments and incompatible shards raise here, before the first batch is asked for.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    manifest = load_manifest(source, split="val")
    check_compatible(
        manifest,
        tokenizer_sha256=tokenizer_sha256,
        vocab_size=vocab_size,
        seq_length=seq_length,
        vocab_padding_multiple=vocab_padding_multiple,
    )
    per_rank = manifest.num_samples // dp_size
    if per_rank == 0:
        raise ValueError(f"{manifest.location}: {manifest.num_samples} samples cannot give each of {dp_size} ranks one")
    begin = dp_rank * per_rank
    end = begin + per_rank if max_batches is None else min(begin + per_rank, begin + max_batches * micro_batch_size)
    return _eval_pass(manifest, shard_urls(manifest, shard_base), begin, end, micro_batch_size)


def _eval_pass(
    manifest: Manifest, urls: list[str], begin: int, end: int, micro_batch_size: int
) -> Iterator[torch.Tensor]:
    buffer: list[np.ndarray] = []
    shard_start = 0
    for url, info in zip(urls, manifest.shards):
        lo, hi = max(begin, shard_start), min(end, shard_start + info.nsamples)
        if lo < hi:
            buffer.extend(read_shard(url, info, manifest)[lo - shard_start : hi - shard_start])
            while len(buffer) >= micro_batch_size:
                yield torch.from_numpy(np.stack(buffer[:micro_batch_size]).astype(np.int64))
                del buffer[:micro_batch_size]
        shard_start += info.nsamples
        if shard_start >= end:
            break
    if buffer:
        yield torch.from_numpy(np.stack(buffer).astype(np.int64))
