"""Turn a run's data settings into shard manifests and a tokenizer, building built-in corpora on
first use (corpus → SentencePiece tokenizer → shards), on global rank 0 while the others wait."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from filelock import FileLock

from loom.data.config import DataConfig
from loom.data.corpora import default_cache_dir, ensure_corpus


@dataclass(frozen=True)
class PreparedData:
    train: str
    eval: str | None
    tokenizer: str


def _prepared_dir(cache: Path, corpus: str, vocab_size: int, tokenizer_type: str, seq_length: int) -> Path:
    """Tokenizer and shards built from built-in corpora, keyed on everything that shapes them."""
    return cache / "prepared" / f"{corpus}-{tokenizer_type}{vocab_size}-seq{seq_length}"


def _build_corpus_shards(
    data: DataConfig,
    corpus: str,
    tokenizer_model: Path | None,
    seq_length: int,
    vocab_size: int,
    log,
    val_percent: float = 0.0,
) -> tuple[dict, Path]:
    """Shards (and, if not given, a tokenizer) for a built-in corpus; cached between runs."""
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Separate jobs sharing the cache (a study's concurrent runs, users on one node) build it once.
    with FileLock(str(cache / ".prepare.lock")):
        return _build_corpus_shards_locked(
            data, corpus, tokenizer_model, seq_length, vocab_size, log, val_percent, cache
        )


def _build_corpus_shards_locked(
    data: DataConfig,
    corpus: str,
    tokenizer_model: Path | None,
    seq_length: int,
    vocab_size: int,
    log,
    val_percent: float,
    cache: Path,
) -> tuple[dict, Path]:
    from loom.data.shards import preprocess
    from loom.data.tokenizer import train_tokenizer

    text = ensure_corpus(corpus, cache)
    if tokenizer_model is None or tokenizer_model.parent.parent == cache / "prepared":
        folder = _prepared_dir(cache, data.corpus, vocab_size, data.tokenizer_type, seq_length)
    else:  # a user's tokenizer: key the shards on its contents
        from loom.data.tokenizer import sha256_file

        folder = cache / "prepared" / f"tokenizer-{sha256_file(tokenizer_model)[:12]}-seq{seq_length}"
    if tokenizer_model is None:
        tokenizer_model = folder / "tokenizer.model"
        if not tokenizer_model.is_file():
            log(f"training a {data.tokenizer_type} tokenizer ({vocab_size} pieces) on {text}")
            folder.mkdir(parents=True, exist_ok=True)
            train_tokenizer(text, folder / "tokenizer", vocab_size=vocab_size, model_type=data.tokenizer_type)
    shards = folder / (f"{corpus}-val{val_percent:g}" if val_percent > 0 else corpus)
    splits = (
        {"train": shards / "train" / "manifest.json", "val": shards / "val" / "manifest.json"}
        if val_percent > 0
        else {"train": shards / "manifest.json"}
    )
    if not all(p.is_file() for p in splits.values()):
        log(f"tokenizing {corpus} into shards of {seq_length + 1} tokens under {shards}")
        preprocess(
            text,
            tokenizer_model,
            shards,
            seq_length,
            samples_per_shard=data.samples_per_shard,
            num_workers=data.preprocess_workers,
            val_percent=val_percent,
        )
    return {k: str(v) for k, v in splits.items()}, tokenizer_model


def _prepare_on_this_rank(data: DataConfig, seq_length: int, vocab_size: int, log) -> PreparedData:
    tokenizer = Path(data.tokenizer) if data.tokenizer else None
    if data.train_data:
        train = data.train_data
        if tokenizer is None:
            candidate = Path(train if not train.endswith(".json") else Path(train).parent) / "tokenizer.model"
            tokenizer = candidate if candidate.is_file() else None
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer: set data.tokenizer or keep tokenizer.model next to {train}")
        held_out = None
    else:
        manifests, tokenizer = _build_corpus_shards(
            data, data.corpus, tokenizer, seq_length, vocab_size, log, data.val_percent
        )
        train, held_out = manifests["train"], manifests.get("val")
    evaluation = data.eval_data
    if evaluation is None and data.eval_corpus:
        manifests, _ = _build_corpus_shards(data, data.eval_corpus, tokenizer, seq_length, vocab_size, log)
        evaluation = manifests["train"]
    evaluation = evaluation or held_out
    return PreparedData(train=str(train), eval=evaluation, tokenizer=str(tokenizer))


def prepare_data(data: DataConfig, seq_length: int, vocab_size: int, log=print) -> PreparedData:
    """Collective: rank 0 prepares, everyone gets the paths (or rank 0's error)."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _prepare_on_this_rank(data, seq_length, vocab_size, log)
        except (OSError, ValueError, RuntimeError) as exc:
            box[0] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ValueError(f"data preparation failed: {box[0]}")
    return box[0]
