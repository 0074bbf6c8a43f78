"""Streaming, exactly resumable loader over token shards, split by data-parallel rank and worker.

Stream layout. Every (DP rank, DataLoader worker) pair is one stream; stream `rank * W + worker`
of `dp_size * W` (W = max(1, num_workers)) gets the shards at positions `stream::dp_size*W` of the
epoch's shard permutation (seeded by (seed, epoch), shared by all streams so each shard goes to
exactly one stream per epoch). A stream reads its shards in pools of `shards_per_pool` consecutive
shards, and yields each pool's samples in a permutation seeded by (seed, epoch, rank, worker, pool):
a per-pool permutation, not a shuffle buffer, so a position is just (epoch, pool, offset).

Every stream is infinite (it starts the next epoch itself), so ranks with fewer samples never run
dry and hang a collective; `epoch` in the state counts completed passes over the stream's shards.
Each shard is verified as it is read (see shard_reader); with on_corrupt="skip" a bad shard
contributes no samples, is logged by name and counted (`TrainLoader.corrupt_shards_skipped`).

A mixture of several shard sets blends such per-source streams (see `mixture`); held-out
evaluation batches are in `eval_loader`.

Resume. torchdata's StatefulDataLoader snapshots each worker's stream position with every batch;
`TrainLoader.state_dict()` is that plus the layout it belongs to. A loader restored from it, in a
fresh process, yields exactly the batches the uninterrupted loader would have yielded next. It
must have the same seed, dp_rank, dp_size, num_workers and micro_batch_size, and the same shard
set; anything else is refused with a ValueError naming the difference (resharding a half-read
epoch onto another layout cannot reproduce the uninterrupted run).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from loom.data.config import ON_CORRUPT
from loom.data.manifest import Manifest, check_compatible, load_manifest, shard_urls
from loom.data.shard_reader import CorruptShardError, read_shard

log = logging.getLogger("loom.data")
STATE_VERSION = 1


class ShardStream(IterableDataset):
    """Infinite stream of samples (LongTensor [seq_length + 1]) for one DP rank; see the module doc."""

    def __init__(
        self,
        manifest: Manifest,
        urls: list[str],
        seed: int,
        dp_rank: int,
        dp_size: int,
        shards_per_pool: int = 4,
        on_corrupt: str = "fail",
    ):
        self.manifest, self.urls = manifest, urls
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.shards_per_pool, self.on_corrupt = shards_per_pool, on_corrupt
        self._state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = copy.deepcopy(state) if state else None

    def _layout(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams = self.dp_size * num_workers
        if len(self.urls) < streams:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.dp_size} DP ranks x {num_workers} workers "
                f"(each stream needs a shard per epoch): preprocess with fewer samples per shard "
                f"or use fewer workers"
            )
        return worker, self.dp_rank * num_workers + worker, streams

    def stream_shards(self, epoch: int, stream: int, streams: int) -> list[int]:
        """Shard indices read by `stream` (of `streams`) in `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [int(i) for i in order[stream::streams]]

    def _pool_samples(self, state: dict[str, Any], shard_ids: list[int], fresh: bool) -> np.ndarray:
        arrays = []
        for index in shard_ids:
            info = self.manifest.shards[index]
            try:
                arrays.append(read_shard(self.urls[index], info, self.manifest))
            except CorruptShardError as exc:
                if self.on_corrupt == "fail":
                    raise
                if fresh:  # a resumed position re-reads its pool; count each skip once
                    log.warning("%s; skipping it (on_corrupt='skip')", exc)
                    state["corrupt_skipped"] += 1
                    if info.name not in state["corrupt_shards"]:
                        state["corrupt_shards"].append(info.name)
        if not arrays:
            return np.zeros((0, self.manifest.sample_length), dtype=np.int64)
        return np.concatenate(arrays)

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must agree with (see TrainLoader)."""
        return self.manifest.fingerprint()

    @staticmethod
    def is_stream_state(tree: dict[str, Any]) -> bool:
        return "streams" in tree and "corrupt_skipped" in tree

    @staticmethod
    def source_states(state: dict[str, Any], active: bool = False) -> list[dict[str, Any]]:
        """The per-source positions inside one stream's state (one source here)."""
        return [state] if state else []

    def scalars(self, states: list[dict[str, Any]]) -> dict[str, float]:
        return {}  # a single source: data/epoch says it all

    def resume_note(self, states: list[dict[str, Any]]) -> str | None:
        return None

    def fresh_state(self, stream: int, streams: int) -> dict[str, Any]:
        return {
            "stream": stream,
            "streams": streams,
            "epoch": 0,
            "pool": 0,
            "offset": 0,
            "samples": 0,
            "corrupt_skipped": 0,
            "corrupt_shards": [],
        }

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, stream, streams = self._layout()
        if self._state is None:
            self._state = self.fresh_state(stream, streams)
        elif (self._state["stream"], self._state["streams"]) != (stream, streams):
            raise ValueError(
                f"loader state belongs to stream {self._state['stream']} of {self._state['streams']}, "
                f"not stream {stream} of {streams}: DP size or num_workers changed"
            )
        yield from self.samples(self._state, worker, stream, streams)

    def samples(self, state: dict[str, Any], worker: int, stream: int, streams: int) -> Iterator[torch.Tensor]:
        """This stream's samples from position `state` on, forever; advances `state` in place.

        A generator: nothing is read until the first sample is asked for."""
        k = self.shards_per_pool
        while True:
            epoch = state["epoch"]
            mine = self.stream_shards(epoch, stream, streams)
            pools = [mine[i : i + k] for i in range(0, len(mine), k)]
            yielded_before = state["samples"]
            started_at_zero = state["pool"] == 0 and state["offset"] == 0
            while state["pool"] < len(pools):
                samples = self._pool_samples(state, pools[state["pool"]], fresh=state["offset"] == 0)
                rng = np.random.default_rng([self.seed, epoch, self.dp_rank, worker, state["pool"]])
                perm = rng.permutation(len(samples))
                while state["offset"] < len(perm):
                    row = samples[perm[state["offset"]]]
                    state["offset"] += 1  # before the yield: a snapshot taken now counts this sample as consumed
                    state["samples"] += 1
                    yield torch.from_numpy(row.astype(np.int64))
                state["pool"] += 1
                state["offset"] = 0
            if started_at_zero and state["samples"] == yielded_before:
                raise RuntimeError(
                    f"{self.manifest.location}: stream {stream} of {streams} read a whole epoch without one "
                    f"usable sample: all its shards are corrupt ({', '.join(state['corrupt_shards'])})"
                )
            state.update(epoch=epoch + 1, pool=0)


def _find_stream_states(tree: Any, is_stream_state) -> list[dict[str, Any]]:
    """Stream states inside torchdata's nested state dict (its layout is private, so search it)."""
    if isinstance(tree, dict):
        if is_stream_state(tree):
            return [tree]
        return [s for value in tree.values() for s in _find_stream_states(value, is_stream_state)]
    return []


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """torchrun and Slurm signal the whole process group on preemption; a worker dying of SIGTERM
    would crash the trainer before it can checkpoint, so workers ignore it and exit with their parent."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class TrainLoader:
    """Infinite iterator of LongTensor batches [micro_batch_size, seq_length + 1] with exact resume."""

    def __init__(self, dataset: IterableDataset, micro_batch_size: int, num_workers: int, prefetch_factor: int = 2):
        self.dataset = dataset
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API in its constructor
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(
                dataset,
                batch_size=micro_batch_size,
                num_workers=num_workers,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
            )
        self._iterator: Iterator[torch.Tensor] | None = None
        self._pending: dict[str, Any] | None = None
        self._failed: str | None = None

    def _layout(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "seed": d.seed,
            "dp_rank": d.dp_rank,
            "dp_size": d.dp_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "shards_per_pool": d.shards_per_pool,
            "dataset": d.fingerprint(),
        }

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._failed is not None:
            raise RuntimeError(f"the data loader stopped after an error: {self._failed}")
        if self._iterator is None:
            self._iterator = iter(self._loader)
            self._pending = None
        try:
            return next(self._iterator)
        except Exception as exc:
            self._failed = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            self.close()  # a dead stream must not restart from the beginning on the next call
            raise

    def state_dict(self) -> dict[str, Any]:
        """Small, picklable and JSON-able: the layout plus every worker's stream position."""
        if self._iterator is None and self._pending is not None:
            return copy.deepcopy(self._pending)
        if self._iterator is None:  # nothing consumed yet: an empty position restores to the start
            return {"version": STATE_VERSION, **self._layout(), "loader": {}}
        return {"version": STATE_VERSION, **self._layout(), "loader": self._loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses (ValueError) a state from another layout or shard set."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data loader state version {state.get('version')!r}")
        for key, value in self._layout().items():
            if state.get(key) != value:
                what = "the shard set (tokenizer, seq_length or shards)" if key == "dataset" else key
                raise ValueError(
                    f"cannot resume the data loader: {what} changed "
                    f"(checkpoint {state.get(key)!r}, now {value!r}); a different DP layout cannot "
                    f"continue the same stream, so resume with the original setting or start the "
                    f"data stream afresh (e.g. a new seed) without loading its state"
                )
        self._stop_workers()
        self._failed = None
        self._pending = copy.deepcopy(state)
        self.dataset.load_state_dict({})  # num_workers=0 keeps the live position on this object
        self._loader.load_state_dict(self._pending["loader"])
        note = self.dataset.resume_note(self.stream_states())
        if note:
            log.warning("%s", note)

    def close(self) -> None:
        """Stop the worker processes now; iterating again continues from the same position."""
        if self._iterator is None:
            return
        state = self.state_dict()
        self._stop_workers()
        self._pending = state
        self._loader.load_state_dict(state["loader"])

    def shutdown(self) -> None:
        """Stop the worker processes for good (the end of a run, whether it finished or raised)."""
        self._stop_workers()

    def _stop_workers(self) -> None:
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            # Now, while its queues are intact: when an exception's traceback keeps the iterator in a
            # reference cycle, the GC finalises the queues first and each worker join times out (5 s).
            shutdown()

    def stream_states(self) -> list[dict[str, Any]]:
        """The position of each of this rank's streams (one per worker) as of the last batch returned."""
        if self._iterator is None:
            tree = self._pending or {}
        elif self.num_workers == 0:
            tree = self.dataset.state_dict()
        else:
            tree = self._loader.state_dict()
        return _find_stream_states(tree, self.dataset.is_stream_state)

    @property
    def corrupt_shards_skipped(self) -> int:
        """Corrupt shards skipped so far by this rank (each skip of each epoch counts), for metrics."""
        return sum(s["corrupt_skipped"] for state in self.stream_states() for s in self.dataset.source_states(state))

    @property
    def epoch(self) -> int:
        """Passes completed by this rank's slowest stream (of a mixture: its least-read source with weight > 0)."""
        states = self.stream_states()
        return min((s["epoch"] for state in states for s in self.dataset.source_states(state, active=True)), default=0)

    def source_scalars(self) -> dict[str, float]:
        """Per-source TensorBoard scalars of a mixture (`data/<source>/tokens`, `.../epoch`); none otherwise."""
        return self.dataset.scalars(self.stream_states())


def check_loader_arguments(
    micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int, on_corrupt: str, shards_per_pool: int
) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size < 1 or num_workers < 0 or shards_per_pool < 1:
        raise ValueError("micro_batch_size and shards_per_pool must be >= 1 and num_workers >= 0")


def build_train_loader(
    source: str | os.PathLike,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    num_workers: int = 1,
    seed: int = 1234,
    on_corrupt: str = "fail",
    *,
    shards_per_pool: int = 4,
    prefetch_factor: int = 2,
    shard_base: str | None = None,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    seq_length: int | None = None,
    vocab_padding_multiple: int = 1,
) -> TrainLoader:
    """Training loader over a manifest (path, folder or URL); checks it against the tokenizer/model first."""
    check_loader_arguments(micro_batch_size, dp_rank, dp_size, num_workers, on_corrupt, shards_per_pool)
    manifest = load_manifest(source, split="train")
    check_compatible(
        manifest,
        tokenizer_sha256=tokenizer_sha256,
        vocab_size=vocab_size,
        seq_length=seq_length,
        vocab_padding_multiple=vocab_padding_multiple,
    )
    streams = dp_size * max(1, num_workers)
    if len(manifest.shards) < streams:
        raise ValueError(
            f"{manifest.location}: {len(manifest.shards)} shards cannot feed {dp_size} DP ranks x "
            f"{max(1, num_workers)} workers (each stream needs at least one shard per epoch); "
            f"re-run preprocess with a smaller --samples-per-shard or use fewer workers"
        )
    dataset = ShardStream(
        manifest,
        shard_urls(manifest, shard_base),
        seed,
        dp_rank,
        dp_size,
        shards_per_pool=shards_per_pool,
        on_corrupt=on_corrupt,
    )
    return TrainLoader(dataset, micro_batch_size, num_workers, prefetch_factor)
