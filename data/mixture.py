"""Data mixtures: a weighted, deterministic blend of several shard sets, exactly resumable.

Every source is read as the plain loader would read it alone (same seed, same rank/worker split,
its own epochs: a source that runs out starts its next epoch without disturbing the others). The
blend decides which source gives the next sample with Megatron's error-minimising interleave: the
source whose count since the blend started lies furthest below its target share (`share * drawn`)
is drawn, ties to the first listed. The choice depends only on the counts, never on the data, so
every (rank, worker) stream draws the same sequence of sources and each source's share of the
consumed tokens stays within a sample or two of its weight (all samples have the same length).

A stream's position is its per-source positions plus the per-source counts; a source with weight 0
is never read. The weights may change between a checkpoint and its resume: the sources continue
where they were and the interleave restarts from the consumed counts, so the new weights hold for
the samples drawn from then on (the cumulative counts in TensorBoard carry on).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from loom.data.config import MixtureSource
from loom.data.loader import ShardStream, TrainLoader, check_loader_arguments
from loom.data.manifest import check_compatible, load_manifest, shard_urls


def pick_source(shares: Sequence[float], drawn: Sequence[int]) -> int:
    """The source furthest below its target after one more sample: argmax of share * (n + 1) - drawn."""
    total = sum(drawn) + 1
    best, best_error = -1, float("-inf")
    for index, (share, count) in enumerate(zip(shares, drawn)):
        if share > 0 and share * total - count > best_error:
            best, best_error = index, share * total - count
    return best


class MixtureStream(IterableDataset):
    """Infinite stream of samples blended from several ShardStreams; see the module doc."""

    def __init__(self, sources: Sequence[ShardStream], names: Sequence[str], weights: Sequence[float]):
        total = float(sum(weights))
        self.sources, self.names = list(sources), list(names)
        self.shares = [w / total for w in weights]
        first = self.sources[0]
        self.seed, self.dp_rank, self.dp_size = first.seed, first.dp_rank, first.dp_size
        self.shards_per_pool = first.shards_per_pool
        self.seq_length = first.manifest.seq_length
        self._state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = copy.deepcopy(state) if state else None

    def fingerprint(self) -> list[dict[str, Any]]:
        """The sources' shard sets in order; names and weights may change on resume."""
        return [source.fingerprint() for source in self.sources]

    @staticmethod
    def is_stream_state(tree: dict[str, Any]) -> bool:
        return "streams" in tree and "blend_start" in tree

    def source_states(self, state: dict[str, Any], active: bool = False) -> list[dict[str, Any]]:
        positions = state.get("sources", [])
        return [p for p, share in zip(positions, self.shares) if share > 0] if active else positions

    def scalars(self, states: list[dict[str, Any]]) -> dict[str, float]:
        """Tokens of every rank per source (each stream draws the same sequence of sources, so all ranks
        hold this rank's counts), and each source's completed epochs on this rank's slowest stream."""
        out = {}
        for index, name in enumerate(self.names):
            samples = sum(state["counts"][index] for state in states)
            out[f"data/{name}/tokens"] = float(samples * self.seq_length * self.dp_size)
            out[f"data/{name}/epoch"] = float(min((s["sources"][index]["epoch"] for s in states), default=0))
        return out

    def resume_note(self, states: list[dict[str, Any]]) -> str | None:
        saved = states[0].get("weights") if states else None
        if saved is None or saved == self.shares:
            return None
        old = ", ".join(f"{n} {w:.3g}" for n, w in zip(self.names, saved))
        new = ", ".join(f"{n} {w:.3g}" for n, w in zip(self.names, self.shares))
        return (
            f"data.mixture weights changed since the checkpoint ({old} -> {new}): every source continues "
            f"where it was and the interleave restarts from the consumed counts"
        )

    def _layout(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = self.dp_size * num_workers
        for name, source, share in zip(self.names, self.sources, self.shares):
            if share > 0 and len(source.urls) < streams:
                raise ValueError(
                    f"data.mixture source {name!r}: {len(source.urls)} shards cannot feed {self.dp_size} DP "
                    f"ranks x {num_workers} workers (each stream needs a shard per epoch)"
                )
        return worker, self.dp_rank * num_workers + worker, streams

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, stream, streams = self._layout()
        if self._state is None:
            count = len(self.sources)
            self._state = {
                "stream": stream,
                "streams": streams,
                "weights": list(self.shares),
                "counts": [0] * count,
                "blend_start": [0] * count,
                "sources": [source.fresh_state(stream, streams) for source in self.sources],
            }
        elif (self._state["stream"], self._state["streams"]) != (stream, streams):
            raise ValueError(
                f"loader state belongs to stream {self._state['stream']} of {self._state['streams']}, "
                f"not stream {stream} of {streams}: DP size or num_workers changed"
            )
        state = self._state
        if state["weights"] != self.shares:  # new weights: the interleave restarts from the consumed counts
            state["weights"], state["blend_start"] = list(self.shares), list(state["counts"])
        readers = [
            source.samples(position, worker, stream, streams)  # generators: a source is opened when first drawn
            for source, position in zip(self.sources, state["sources"])
        ]
        counts, start = state["counts"], state["blend_start"]
        drawn = [c - s for c, s in zip(counts, start)]
        while True:
            index = pick_source(self.shares, drawn)
            row = next(readers[index])
            counts[index] += 1  # before the yield, as the sources count their positions
            drawn[index] += 1
            yield row


def build_mixture_loader(
    sources: Sequence[MixtureSource],
    micro_batch_size: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 1,
    seed: int = 1234,
    on_corrupt: str = "fail",
    shards_per_pool: int = 4,
    prefetch_factor: int = 2,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    seq_length: int | None = None,
    vocab_padding_multiple: int = 1,
) -> TrainLoader:
    """Training loader over a weighted blend of shard sets (each `path` a manifest, folder or URL).

    Every source must hold samples of the same tokenizer and length; each is checked against the
    tokenizer/model as `build_train_loader` checks a single set."""
    check_loader_arguments(micro_batch_size, dp_rank, dp_size, num_workers, on_corrupt, shards_per_pool)
    if not sources:
        raise ValueError("data.mixture is empty: give at least one source")
    names = [s.display_name() for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.mixture: source names must differ, got {names}; give each a distinct `name`")
    if any(not s.weight >= 0 for s in sources) or not any(s.weight > 0 for s in sources):
        raise ValueError(f"data.mixture weights must be >= 0 with one > 0, got {[s.weight for s in sources]}")
    streams, first = [], None
    for name, source in zip(names, sources):
        manifest = load_manifest(source.path, split="train")
        check_compatible(
            manifest,
            tokenizer_sha256=tokenizer_sha256,
            vocab_size=vocab_size,
            seq_length=seq_length,
            vocab_padding_multiple=vocab_padding_multiple,
        )
        if first is None:
            first = (name, manifest)
        elif manifest.tokenizer_sha256 != first[1].tokenizer_sha256:
            raise ValueError(
                f"data.mixture: sources {first[0]!r} and {name!r} were tokenized with different tokenizers "
                f"(sha256 {first[1].tokenizer_sha256[:12]}… and {manifest.tokenizer_sha256[:12]}…); "
                f"preprocess every source with one tokenizer"
            )
        elif manifest.sample_length != first[1].sample_length or manifest.dtype != first[1].dtype:
            raise ValueError(
                f"data.mixture: sources {first[0]!r} and {name!r} hold samples of different lengths "
                f"(seq_length {first[1].seq_length} and {manifest.seq_length}); preprocess both with one --seq-length"
            )
        if source.weight > 0 and len(manifest.shards) < dp_size * max(1, num_workers):
            raise ValueError(
                f"data.mixture source {name!r} ({manifest.location}): {len(manifest.shards)} shards cannot feed "
                f"{dp_size} DP ranks x {max(1, num_workers)} workers (each stream needs at least one shard per "
                f"epoch); re-run preprocess with a smaller --samples-per-shard or use fewer workers"
            )
        urls = shard_urls(manifest, source.shard_base)
        streams.append(ShardStream(manifest, urls, seed, dp_rank, dp_size, shards_per_pool, on_corrupt))
    dataset = MixtureStream(streams, names, [s.weight for s in sources])
    return TrainLoader(dataset, micro_batch_size, num_workers, prefetch_factor)
