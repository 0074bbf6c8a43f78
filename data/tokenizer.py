"""SentencePiece tokenizer: training with Llama-style settings, and a small wrapper for loading it.

The settings (byte fallback, split digits, identity normalisation, whitespace kept as is, ids
pad/unk/bos/eos = 0/1/2/3) make every string round-trip exactly and let a BPE model export to a
Hugging Face `LlamaTokenizer`. Newlines never enter the vocabulary (the trainer reads lines), so
each one becomes the byte token `<0x0A>`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from loom.data.corpora import iter_documents

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
_BYTE_PIECES = 256


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _training_lines(documents: Iterable[str]) -> Iterator[str]:
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def weighted_lines(inputs: Sequence[str | os.PathLike], weights: Sequence[float], seed: int = 0) -> Iterator[str]:
    """Training lines drawn from each input in proportion to its weight, as many as all inputs hold.

    Input i gives round(share_i * total lines): every line once per whole repetition, then a seeded
    sample of the rest (in file order), so a small input with a large weight is repeated and a large
    one with a small weight is subsampled. Inputs with weight 0 are not read."""
    if len(weights) != len(inputs):
        raise ValueError(f"{len(weights)} weights for {len(inputs)} inputs: give one weight per input")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"input weights must be finite and >= 0 with a positive sum, got {list(weights)}")
    per_input = [list(_training_lines(iter_documents(src))) if w > 0 else [] for src, w in zip(inputs, weights)]
    total, weight_sum = sum(len(lines) for lines in per_input), float(sum(weights))
    for index, (lines, weight) in enumerate(zip(per_input, weights)):
        wanted = round(weight / weight_sum * total)
        if not lines or wanted == 0:
            continue
        repeats, rest = divmod(wanted, len(lines))
        for _ in range(repeats):
            yield from lines
        for line_index in sorted(random.Random(f"{seed}:{index}").sample(range(len(lines)), rest)):
            yield lines[line_index]


def train_tokenizer(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_prefix: str | os.PathLike,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    *,
    input_weights: Sequence[float] | None = None,
    num_threads: int | None = None,
    input_sentence_size: int = 0,
    max_sentence_length: int = 16384,
    user_defined_symbols: Sequence[str] = (),
    verbose: bool = False,
) -> Path:
    """Train on text files/globs (see `iter_documents`); writes `<out_prefix>.model` and `.vocab`.

    `input_weights` (one per input: a file, glob or folder) sets each input's share of the training
    lines (see `weighted_lines`); None takes every line once. `input_sentence_size` > 0 samples that
    many lines (the speed knob for unigram); 0 uses all. Returns the path of the .model file.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    minimum = 4 + _BYTE_PIECES + len(user_defined_symbols) + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: 4 special ids + 256 byte pieces need at least {minimum}"
        )
    if input_weights is not None:
        sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        lines = weighted_lines(sources, input_weights)
    else:
        lines = _training_lines(iter_documents(inputs))
    first = next(lines, None)
    if first is None:
        raise ValueError(f"no text found in {inputs!s}: cannot train a tokenizer on empty input")

    def all_lines() -> Iterator[str]:
        yield first
        yield from lines

    prefix = Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(),
            model_prefix=str(prefix),
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            split_digits=True,
            num_threads=num_threads or os.cpu_count() or 1,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(user_defined_symbols),
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size is too high" on a small corpus
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}: {exc}") from None
    return Path(f"{prefix}.model")


class Tokenizer:
    """A trained SentencePiece model; `sha256` identifies it in shard manifests and checkpoints."""

    def __init__(self, model_path: str | os.PathLike):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(self.path)!r} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError as exc:  # sentencepiece: "INTERNAL: could not parse ModelProto from ..."
            raise ValueError(
                f"tokenizer model {str(self.path)!r} is not a SentencePiece model ({str(exc).strip()})"
            ) from None

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad/bos/eos ids decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
