"""Turn a run's data settings into shard manifests and a tokenizer, building built-in corpora on
first use (corpus → SentencePiece tokenizer → shards), on global rank 0 while the others wait.

A mixture's built-in corpora share one tokenizer trained on all of them, each an equal share of the
training lines whatever the weights (so changing the weights never changes the tokenizer); with
shard sets in the mixture, the tokenizer is `data.tokenizer` or the one stored next to the first."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from filelock import FileLock

from loom.data.config import DataConfig, MixtureSource
from loom.data.corpora import default_cache_dir, ensure_corpus
from loom.model.parallel import comm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    train: str
    """Training manifest; of a mixture, its first source's."""
    eval: str | None
    """Held-out manifest; with several held-out sets, the first one's."""
    tokenizer: str
    mixture: tuple[MixtureSource, ...] = ()
    """The training sources (manifest paths, names resolved) when `data.mixture` is set."""
    eval_sources: tuple[MixtureSource, ...] = ()
    """The held-out sets (manifest paths, names resolved) when there are several."""


def _prepared_dir(cache: Path, corpus: str, vocab_size: int, tokenizer_type: str, seq_length: int) -> Path:
    """Tokenizer and shards built from built-in corpora, keyed on everything that shapes them."""
    return cache / "prepared" / f"{corpus}-{tokenizer_type}{vocab_size}-seq{seq_length}"


def _build_corpus_shards(
    data: DataConfig,
    corpus: str,
    tokenizer_model: Path | None,
    seq_length: int,
    vocab_size: int,
    val_percent: float = 0.0,
    tokenizer_corpora: Sequence[str] = (),
) -> tuple[dict, Path]:
    """Shards (and, if not given, a tokenizer trained on `tokenizer_corpora`, default `data.corpus`)
    for a built-in corpus; cached between runs."""
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Separate jobs sharing the cache (a study's concurrent runs, users on one node) build it once.
    with FileLock(str(cache / ".prepare.lock")):
        return _build_corpus_shards_locked(
            data, corpus, tokenizer_model, seq_length, vocab_size, val_percent, cache, tokenizer_corpora
        )


def _build_corpus_shards_locked(
    data: DataConfig,
    corpus: str,
    tokenizer_model: Path | None,
    seq_length: int,
    vocab_size: int,
    val_percent: float,
    cache: Path,
    tokenizer_corpora: Sequence[str],
) -> tuple[dict, Path]:
    from loom.data.shards import preprocess
    from loom.data.tokenizer import train_tokenizer

    text = ensure_corpus(corpus, cache)
    tokenizer_corpora = list(tokenizer_corpora) or [data.corpus]
    key = "+".join(tokenizer_corpora)
    if tokenizer_model is None or tokenizer_model.parent.parent == cache / "prepared":
        folder = _prepared_dir(cache, key, vocab_size, data.tokenizer_type, seq_length)
    else:  # a user's tokenizer: key the shards on its contents
        from loom.data.tokenizer import sha256_file

        folder = cache / "prepared" / f"tokenizer-{sha256_file(tokenizer_model)[:12]}-seq{seq_length}"
    if tokenizer_model is None:
        tokenizer_model = folder / "tokenizer.model"
        if not tokenizer_model.is_file():
            texts = [ensure_corpus(name, cache) for name in tokenizer_corpora]
            on = ", ".join(map(str, texts))
            log.info(f"training a {data.tokenizer_type} tokenizer ({vocab_size} pieces) on {on}")
            folder.mkdir(parents=True, exist_ok=True)
            train_tokenizer(
                texts[0] if len(texts) == 1 else texts,
                folder / "tokenizer",
                vocab_size=vocab_size,
                model_type=data.tokenizer_type,
                input_weights=None if len(texts) == 1 else [1.0] * len(texts),
            )
    shards = folder / (f"{corpus}-val{val_percent:g}" if val_percent > 0 else corpus)
    splits = (
        {"train": shards / "train" / "manifest.json", "val": shards / "val" / "manifest.json"}
        if val_percent > 0
        else {"train": shards / "manifest.json"}
    )
    if not all(p.is_file() for p in splits.values()):
        log.info(f"tokenizing {corpus} into shards of {seq_length + 1} tokens under {shards}")
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


def _tokenizer_next_to(train: str) -> Path | None:
    candidate = Path(train if not train.endswith(".json") else Path(train).parent) / "tokenizer.model"
    return candidate if candidate.is_file() else None


def _eval_sources(
    data: DataConfig, tokenizer: Path, key: Sequence[str], seq_length: int, vocab_size: int, held_out: list
) -> list[MixtureSource]:
    """The held-out sets: data.eval_mixture, data.eval_data, data.eval_corpus, else the val splits."""

    def corpus_manifest(corpus: str) -> str:  # a whole corpus held out: its shards without a split
        return _build_corpus_shards(data, corpus, tokenizer, seq_length, vocab_size, 0.0, key)[0]["train"]

    if data.eval_mixture:
        return [
            replace(e, path=corpus_manifest(e.path) if e.is_corpus() else e.path, name=e.display_name())
            for e in data.eval_mixture
        ]
    if data.eval_data is not None:
        return [MixtureSource(path=data.eval_data)]
    if data.eval_corpus:
        return [MixtureSource(path=corpus_manifest(data.eval_corpus), name=data.eval_corpus)]
    return held_out


def _prepare_mixture(data: DataConfig, seq_length: int, vocab_size: int) -> tuple[list, Path, list, list]:
    """(training sources, tokenizer, their held-out val splits, tokenizer corpora) of data.mixture."""
    tokenizer = Path(data.tokenizer) if data.tokenizer else None
    shard_sets = [e for e in data.mixture if not e.is_corpus()]
    for entry in shard_sets:
        local = not entry.path.startswith(("http://", "https://", "pipe:", "file:"))
        if local and not Path(entry.path).exists():
            raise FileNotFoundError(
                f"data.mixture source {entry.display_name()!r}: no such file or folder {entry.path}"
            )
    if tokenizer is None and shard_sets:
        tokenizer = _tokenizer_next_to(shard_sets[0].path)
        if tokenizer is None:
            raise FileNotFoundError(
                f"no tokenizer: set data.tokenizer or keep tokenizer.model next to {shard_sets[0].path}"
            )
    corpora = sorted({e.path for e in data.mixture if e.is_corpus()})
    sources, held_out = [], []
    for entry in data.mixture:
        name = entry.display_name()
        if not entry.is_corpus():
            sources.append(replace(entry, name=name))
            continue
        manifests, tokenizer = _build_corpus_shards(
            data, entry.path, tokenizer, seq_length, vocab_size, data.val_percent, corpora
        )
        sources.append(replace(entry, path=manifests["train"], name=name))
        if "val" in manifests:
            held_out.append(MixtureSource(path=manifests["val"], name=name))
    return sources, tokenizer, held_out, corpora


def _prepare_on_this_rank(data: DataConfig, seq_length: int, vocab_size: int) -> PreparedData:
    if data.mixture:
        sources, tokenizer, held_out, key = _prepare_mixture(data, seq_length, vocab_size)
        evals = _eval_sources(data, tokenizer, key, seq_length, vocab_size, held_out)
        return PreparedData(
            train=sources[0].path,
            eval=evals[0].path if evals else None,
            tokenizer=str(tokenizer),
            mixture=tuple(sources),
            eval_sources=tuple(evals) if len(evals) > 1 else (),
        )
    tokenizer = Path(data.tokenizer) if data.tokenizer else None
    if data.train_data:
        train = data.train_data
        if tokenizer is None:
            tokenizer = _tokenizer_next_to(train)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer: set data.tokenizer or keep tokenizer.model next to {train}")
        held_out = []
    else:
        manifests, tokenizer = _build_corpus_shards(
            data, data.corpus, tokenizer, seq_length, vocab_size, data.val_percent
        )
        train = manifests["train"]
        held_out = [MixtureSource(path=manifests["val"], name=data.corpus)] if "val" in manifests else []
    evals = _eval_sources(data, tokenizer, [data.corpus], seq_length, vocab_size, held_out)
    return PreparedData(
        train=str(train),
        eval=evals[0].path if evals else None,
        tokenizer=str(tokenizer),
        eval_sources=tuple(evals) if len(evals) > 1 else (),
    )


def prepare_data(data: DataConfig, seq_length: int, vocab_size: int) -> PreparedData:
    """Collective: rank 0 prepares, everyone gets the paths (or rank 0's error)."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _prepare_on_this_rank(data, seq_length, vocab_size)
        except (OSError, ValueError, RuntimeError) as exc:
            box[0] = f"{type(exc).__name__}: {exc}"
    box[0] = comm.broadcast_object(box[0])
    if isinstance(box[0], str):
        raise ValueError(f"data preparation failed: {box[0]}")
    return box[0]
