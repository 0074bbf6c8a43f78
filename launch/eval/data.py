"""Held-out text for `loom eval`: the token stream, the documents of the document pass, probe
filler, and training-token frequencies for the frequency buckets."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from loom.launch.eval.settings import EvalSettings
from loom.techniques.metrics import recall as rec_m

log = logging.getLogger(__name__)


@dataclass
class Heldout:
    stream: np.ndarray
    """Held-out token ids, documents separated by EOS."""
    docs: list
    """Selected documents (token arrays without EOS) for the document pass."""
    filler: np.ndarray
    """The stream without EOS tokens (probe filler)."""
    words: list
    source: str
    doc_source: list
    """Index of the source document of each entry of `docs` (segments of one document share it)."""


def split_docs(stream: np.ndarray, eos: int, complete_tail: bool) -> list[np.ndarray]:
    cuts = np.flatnonzero(stream == eos)
    docs, prev = [], 0
    for c in cuts:
        docs.append(stream[prev:c])
        prev = c + 1
    if complete_tail and prev < len(stream):
        docs.append(stream[prev:])
    return [d for d in docs if len(d)]


def read_heldout(source: str, tokenizer, settings: EvalSettings, cache_dir: Optional[str]) -> tuple[np.ndarray, str]:
    """Token stream of `source`: a shard manifest (or its folder; the `val` split when present),
    a built-in corpus name, or text files (.txt/.jsonl/.jsonl.gz, globs, folders)."""
    from loom.data.corpora import CORPORA, ensure_corpus, iter_documents
    from loom.data.manifest import check_compatible, load_manifest, shard_urls
    from loom.data.shard_reader import read_shard

    limit = settings.max_stream_tokens
    path = Path(source)
    is_manifest = source.endswith(".json") or (
        path.is_dir() and ((path / "manifest.json").is_file() or (path / "val" / "manifest.json").is_file())
    )
    if is_manifest or "://" in source or source.startswith("pipe:"):
        manifest = load_manifest(source, split="val")
        check_compatible(manifest, tokenizer_sha256=tokenizer.sha256)
        parts, total = [], 0
        for url, info in zip(shard_urls(manifest), manifest.shards):
            arr = read_shard(url, info, manifest).reshape(-1).astype(np.int64)
            parts.append(arr)
            total += arr.size
            if total >= limit:
                break
        return np.concatenate(parts)[:limit], f"manifest {manifest.location}"
    if source in CORPORA:
        files = ensure_corpus(source, cache_dir)
        label = f"corpus {source}"
    else:
        files = source
        label = f"text {source}"
    parts, total = [], 0
    for text in iter_documents(files):
        ids = tokenizer.encode(text, eos=True)
        parts.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if total >= limit:
            break
    if not parts:
        raise ValueError(f"no documents in {source}")
    return np.concatenate(parts), label


def select_heldout(
    stream: np.ndarray, tokenizer, label: str, settings: EvalSettings, seq_length: int, from_manifest: bool
) -> Heldout:
    eos = tokenizer.eos_id
    docs = split_docs(stream, eos, complete_tail=True)  # a manifest's last document may be cut: still real text
    min_len = max(settings.min_doc_tokens, seq_length)
    # a long document gives up to `doc_segments` consecutive segments of max_doc_tokens; segments
    # keep their source document's index, so cross-document statistics never pair a document with itself
    segments = []
    for i, d in enumerate(docs):
        for k in range(max(1, settings.doc_segments)):
            seg = d[k * settings.max_doc_tokens : (k + 1) * settings.max_doc_tokens]
            if len(seg) >= min_len:
                segments.append((i, seg))
    rng = random.Random(settings.seed)
    chosen = sorted(rng.sample(range(len(segments)), min(settings.max_docs, len(segments))))
    filler = stream[stream != eos]
    words = rec_m.key_words(tokenizer.decode(filler[:60000].tolist()))
    return Heldout(
        stream=stream,
        docs=[segments[i][1] for i in chosen],
        filler=filler,
        words=words,
        source=label,
        doc_source=[segments[i][0] for i in chosen],
    )


def training_token_counts(train_source: Optional[str], vocab_size: int) -> Optional[np.ndarray]:
    """Token frequencies on the tokenized training corpus (for the frequency buckets), from its shard manifest."""
    if not train_source:
        return None
    from loom.data.manifest import load_manifest, shard_urls
    from loom.data.shard_reader import read_shard

    try:
        manifest = load_manifest(train_source, split="train")
    except (OSError, ValueError) as exc:
        log.warning(f"no training-frequency buckets: {exc}")
        return None
    counts = np.zeros(vocab_size, dtype=np.int64)
    for url, info in zip(shard_urls(manifest), manifest.shards):
        arr = read_shard(url, info, manifest).reshape(-1)
        counts += np.bincount(arr, minlength=vocab_size)[:vocab_size]
    return counts


def continuation_encoder(tokenizer):
    """`encode` for text that continues running text: drops the lone dummy-prefix piece that
    SentencePiece puts in front of a string starting with a space."""
    lone = {i for i in range(min(tokenizer.vocab_size, 4096)) if tokenizer.id_to_piece(i) == "\u2581"}

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        if text.startswith(" ") and ids and ids[0] in lone:
            ids = ids[1:]
        return ids

    return encode


_STOPWORDS = {
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "or",
    "in",
    "on",
    "is",
    "it",
    "that",
    "this",
    "as",
    "for",
    "with",
    "be",
    "by",
    "at",
    "from",
}


def non_content_positions(ids, tokenizer) -> list[int]:
    """Positions of "non-content" tokens (punctuation, whitespace, byte pieces, stopwords): the
    candidates for LI's one-token prompt perturbation (LCM metric 3)."""
    out = []
    for i, t in enumerate(ids):
        piece = tokenizer.id_to_piece(int(t)).replace("\u2581", "").strip()
        if not piece or piece.startswith("<0x") or not any(c.isalnum() for c in piece) or piece.lower() in _STOPWORDS:
            out.append(i)
    return out
