"""Text → token shards: tokenize documents in parallel, pack them into fixed samples, write .tar shards.

Each document is followed by EOS, documents are concatenated in input order, and the stream is cut
into non-overlapping samples of `seq_length + 1` tokens (the last partial sample is dropped). EOS
tokens mark document boundaries, so positions-in-document can be derived from a sample alone.
A sample is one tar member `<key>.tokens.u16` (or `.u32`) of raw little-endian ids. Shards are
written with mtime 0 and the USTAR format, so the same input gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import tarfile
import zlib
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from loom.data.corpora import expand_inputs, iter_documents
from loom.data.manifest import Manifest, ShardInfo
from loom.data.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.model"
_CHUNKSIZE = 32  # documents per task sent to a tokenizer process: amortises IPC, keeps order cheap


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16, or uint32 once ids no longer fit."""
    return np.dtype("<u2" if vocab_size < 65536 else "<u4")


def in_validation_split(text: str, val_percent: float) -> bool:
    """Deterministic, order-independent split: the crc32 of the text picks a bucket in [0, 100) (0.01 steps)."""
    return (zlib.crc32(text.encode("utf-8")) % 10000) < round(val_percent * 100)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)


def _encode(text: str, val_percent: float = 0.0) -> tuple[bool, np.ndarray]:
    """(goes to the validation split, token ids + EOS) for one document."""
    tok = _worker_tokenizer
    is_val = val_percent > 0 and in_validation_split(text, val_percent)
    return is_val, np.asarray(tok.encode(text, eos=True), dtype=token_dtype(tok.vocab_size))


class _ShardPacker:
    """Accumulates a token stream and writes full shards of fixed-length samples as it grows."""

    def __init__(self, out_dir: Path, split: str, tokenizer: Tokenizer, seq_length: int, samples_per_shard: int):
        self.out_dir, self.split, self.tokenizer = out_dir, split, tokenizer
        self.sample_length, self.samples_per_shard = seq_length + 1, samples_per_shard
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.key_ext = "tokens.u16" if self.dtype.itemsize == 2 else "tokens.u32"
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardInfo] = []
        self.num_documents = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("shard-*.tar"), out_dir / "manifest.json"]:  # a re-run replaces the set
            stale.unlink(missing_ok=True)

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.num_documents += 1
        if self.pending_tokens >= self.sample_length * self.samples_per_shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        per_shard = self.sample_length * self.samples_per_shard
        start = 0
        while len(stream) - start >= per_shard or (final and len(stream) - start >= self.sample_length):
            count = min(self.samples_per_shard, (len(stream) - start) // self.sample_length)
            end = start + count * self.sample_length
            self._write_shard(stream[start:end].reshape(count, self.sample_length))
            start = end
        self.pending = [stream[start:]]
        self.pending_tokens = len(stream) - start

    def _write_shard(self, samples: np.ndarray) -> None:
        index = len(self.shards)
        name = f"shard-{index:06d}.tar"
        path = self.out_dir / name
        with open(path, "wb") as f, wds.TarWriter(f, mtime=0, format=tarfile.USTAR_FORMAT) as writer:
            for i, sample in enumerate(samples):
                writer.write({"__key__": f"s{index:06d}_{i:06d}", self.key_ext: sample.tobytes()})
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.shards.append(ShardInfo(name=name, nsamples=len(samples), sha256=digest, nbytes=path.stat().st_size))

    def finish(self) -> Manifest:
        self._flush(final=True)
        shutil.copyfile(self.tokenizer.path, self.out_dir / TOKENIZER_FILE)
        num_samples = sum(s.nsamples for s in self.shards)
        manifest = Manifest(
            seq_length=self.sample_length - 1,
            dtype=self.dtype.name,
            vocab_size=self.tokenizer.vocab_size,
            eos_id=self.tokenizer.eos_id,
            tokenizer_sha256=self.tokenizer.sha256,
            tokenizer_file=TOKENIZER_FILE,
            num_documents=self.num_documents,
            num_samples=num_samples,
            num_tokens=num_samples * self.sample_length,
            dropped_tokens=self.pending_tokens,
            split=self.split,
            shards=self.shards,
            location=str(self.out_dir),
        )
        manifest.save(self.out_dir)
        return manifest


def _tokenized(
    documents: Iterator[str], model_path: str, num_workers: int, val_percent: float
) -> Iterator[tuple[bool, np.ndarray]]:
    if num_workers <= 1:
        _init_worker(model_path)
        for text in documents:
            yield _encode(text, val_percent)
        return
    with mp.get_context().Pool(num_workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        # imap keeps input order whatever the worker count, so the output is identical for any num_workers
        yield from pool.imap(partial(_encode, val_percent=val_percent), documents, chunksize=_CHUNKSIZE)


def preprocess(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_length: int,
    samples_per_shard: int = 256,
    num_workers: int | None = None,
    val_percent: float = 0.0,
    progress: bool = True,
) -> dict[str, Path]:
    """Tokenize text files/globs into shards under `out_dir`; returns {split: manifest path}.

    With `val_percent` > 0, documents whose crc32 bucket falls below it go to `out_dir/val`, the
    rest to `out_dir/train`; otherwise everything goes to `out_dir` itself (returned as "train").
    """
    if seq_length < 1 or samples_per_shard < 1:
        raise ValueError(f"seq_length ({seq_length}) and samples_per_shard ({samples_per_shard}) must be positive")
    if not 0.0 <= val_percent < 100.0:
        raise ValueError(f"val_percent must be in [0, 100), got {val_percent}")
    paths = expand_inputs(inputs)  # missing inputs are reported before the tokenizer is loaded
    tokenizer = Tokenizer(tokenizer_model)
    out = Path(out_dir)
    splits = {"train": out / "train", "val": out / "val"} if val_percent > 0 else {"train": out}
    documents = iter_documents(paths)
    first = next(documents, None)
    if first is None:
        raise ValueError(f"no documents found in {inputs!s}: nothing to preprocess")

    def all_documents() -> Iterator[str]:
        yield first
        yield from documents

    packers = {
        name: _ShardPacker(folder, name if val_percent > 0 else "all", tokenizer, seq_length, samples_per_shard)
        for name, folder in splits.items()
    }
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, mininterval=1.0)
    tokens = 0
    for is_val, ids in _tokenized(all_documents(), str(tokenizer.path), workers, val_percent):
        packers["val" if is_val else "train"].add(ids)
        tokens += len(ids)
        bar.update(1)
        bar.set_postfix(tokens=tokens, refresh=False)
    bar.close()
    manifests = {name: packer.finish() for name, packer in packers.items()}
    if all(m.num_samples == 0 for m in manifests.values()):
        raise ValueError(f"input has only {tokens} tokens, fewer than one sample of seq_length+1 = {seq_length + 1}")
    return {name: folder / "manifest.json" for name, folder in splits.items()}
