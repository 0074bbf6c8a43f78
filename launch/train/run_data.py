"""A run's data streams from its prepared data (one shard set or a mixture): the training loader,
the held-out batches of one or several eval sets, and the unigram baseline a held-out loss is set against."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from loom.data.config import MixtureSource
from loom.launch.train.prepare_data import PreparedData


def make_train_loader(cfg, data: PreparedData, dp_rank: int, dp_size: int, tokenizer_sha256: str):
    """This rank's resumable training loader: a blend of `data.mixture`, or the one training shard set."""
    from loom.data.loader import build_train_loader
    from loom.data.mixture import build_mixture_loader

    d = cfg.data
    common = dict(
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=d.num_workers,
        seed=d.seed,
        on_corrupt=d.on_corrupt,
        shards_per_pool=d.shards_per_pool,
        prefetch_factor=d.prefetch_factor,
        tokenizer_sha256=tokenizer_sha256,
        vocab_size=cfg.model.vocab_size,
        seq_length=cfg.model.seq_length,
    )
    if data.mixture:
        return build_mixture_loader(data.mixture, cfg.train.micro_batch_size, **common)
    return build_train_loader(data.train, cfg.train.micro_batch_size, shard_base=d.shard_base, **common)


def make_eval_batches(cfg, data: PreparedData, dp_rank: int, dp_size: int, tokenizer_sha256: str) -> Callable:
    """What EvalCallback calls before each evaluation: the batches of the held-out set, or with several
    sets {name: (weight, batches)}."""
    from loom.data.eval_loader import eval_batches

    def batches(path: str):
        return eval_batches(
            path,
            cfg.train.micro_batch_size,
            dp_rank,
            dp_size,
            max_batches=cfg.data.eval_max_batches,
            seq_length=cfg.model.seq_length,
            tokenizer_sha256=tokenizer_sha256,
        )

    if data.eval_sources:
        return lambda: {s.name: (s.weight, batches(s.path)) for s in data.eval_sources}
    return lambda: batches(data.eval)


def evaluate_sources(module, sources: Mapping[str, tuple[float, Iterable]]) -> dict[str, float]:
    """`eval/<name>/loss` and `/perplexity` per eval set ({name: (weight, batches)}), and `eval/loss`
    as their weight-averaged loss. Collective: every rank evaluates the sets in the same order."""
    out: dict[str, float] = {}
    weighted, total_weight = 0.0, 0.0
    for name, (weight, batches) in sources.items():
        result = module.evaluate(batches)
        if not result:
            continue
        out[f"eval/{name}/loss"] = result["eval/loss"]
        out[f"eval/{name}/perplexity"] = result["eval/perplexity"]
        weighted += weight * result["eval/loss"]
        total_weight += weight
    if total_weight > 0:
        out["eval/loss"] = weighted / total_weight
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 50.0))
    return out


def unigram_baseline(data: PreparedData, vocab_size: int) -> Callable[[], float] | None:
    """The unigram baseline of the run's training stream on its held-out data; None without held-out data."""
    from loom.launch.train.baselines import unigram_cross_entropy

    if not data.eval:
        return None
    if not data.mixture and not data.eval_sources:
        return lambda: unigram_cross_entropy(data.train, data.eval, vocab_size)
    train = data.mixture or (MixtureSource(path=data.train),)
    held_out = data.eval_sources or (MixtureSource(path=data.eval),)
    return lambda: mixture_unigram_cross_entropy(train, held_out, vocab_size)


def mixture_unigram_cross_entropy(
    train: Sequence[MixtureSource], held_out: Sequence[MixtureSource], vocab_size: int
) -> float:
    """Nats per held-out token under the training stream's token distribution: each source's add-one
    smoothed unigram mixed by its share, averaged over the held-out sets by their weights as `eval/loss`
    is. With one source and one set this is `baselines.unigram_cross_entropy`."""
    from loom.launch.train.baselines import token_counts

    active = [s for s in train if s.weight > 0]
    total = sum(s.weight for s in active)
    probabilities = np.zeros(vocab_size, dtype=np.float64)
    for source in active:
        counts = token_counts(source.path, vocab_size) + 1
        probabilities += source.weight / total * counts / counts.sum()
    log_p = np.log(probabilities)
    losses, weights = [], []
    for held in held_out:
        counts = token_counts(held.path, vocab_size, split="val")
        losses.append(float(-(counts * log_p).sum() / max(counts.sum(), 1)))
        weights.append(held.weight)
    return float(np.average(losses, weights=weights)) if sum(weights) > 0 else float(np.mean(losses))
