"""Streaming loader: exact resume, exactly-once epochs, infinite ranks, URL schemes, layout checks."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from loom.data.eval_loader import eval_batches
from loom.data.loader import build_train_loader
from loom.data.manifest import load_manifest
from loom.data.shard_reader import read_shard


def take(loader, n: int) -> list[torch.Tensor]:
    return [next(loader) for _ in range(n)]


def all_samples(shard_dir) -> Counter:
    m = load_manifest(shard_dir)
    rows = [row for s in m.shards for row in read_shard(str(shard_dir / s.name), s, m)]
    return Counter(row.tobytes() for row in rows)


def key(row: torch.Tensor) -> bytes:
    return row.numpy().astype(np.uint16).tobytes()


@pytest.mark.parametrize("dp_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(small_shards, dp_size, num_workers):
    for rank in range(dp_size):

        def build():
            return build_train_loader(
                small_shards,
                micro_batch_size=6,
                dp_rank=rank,
                dp_size=dp_size,
                num_workers=num_workers,
                seed=11,
                shards_per_pool=2,
            )

        reference = build()
        full = take(reference, 60)  # > 1 epoch for every layout
        reference.close()
        first = build()
        head = take(first, 23)
        first.close()  # stops the workers; the position is kept
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON data
        continued = take(first, 37)
        first.close()
        resumed = build()
        resumed.load_state_dict(state)
        tail = take(resumed, 37)
        resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(continued, tail))
        assert full[0].shape == (6, 16) and full[0].dtype == torch.int64
        assert all(torch.equal(a, b) for a, b in zip(full, head + tail)), (rank, dp_size, num_workers)
        assert len(json.dumps(state)) < 4096


@pytest.mark.parametrize("dp_size,num_workers", [(1, 0), (2, 1), (2, 2)])
def test_every_sample_is_seen_exactly_once_per_epoch(small_shards, dp_size, num_workers):
    manifest = load_manifest(small_shards)
    workers = max(1, num_workers)
    seen: Counter = Counter()
    for rank in range(dp_size):
        loader = build_train_loader(
            small_shards, micro_batch_size=1, dp_rank=rank, dp_size=dp_size, num_workers=num_workers, seed=5
        )
        streams = dp_size * workers
        counts = [
            sum(manifest.shards[i].nsamples for i in loader.dataset.stream_shards(0, rank * workers + w, streams))
            for w in range(workers)
        ]
        per_worker: list[list[torch.Tensor]] = [[] for _ in range(workers)]
        step = 0
        while any(len(per_worker[w]) < counts[w] for w in range(workers)):
            per_worker[step % workers].append(next(loader)[0])  # the DataLoader takes workers round-robin
            step += 1
        loader.close()
        for w in range(workers):
            seen.update(key(row) for row in per_worker[w][: counts[w]])
    assert seen == all_samples(small_shards)


def test_streams_are_infinite_count_epochs_and_reshuffle(small_shards):
    n = load_manifest(small_shards).num_samples
    loader = build_train_loader(small_shards, micro_batch_size=1, num_workers=0, seed=3)
    epoch0 = [key(b[0]) for b in take(loader, n)]
    assert loader.epoch == 0
    epoch1 = [key(b[0]) for b in take(loader, n)]
    assert loader.epoch == 1 and Counter(epoch0) == Counter(epoch1) and epoch0 != epoch1
    # ranks get unequal sample counts per epoch, yet both keep yielding for several epochs
    for rank in range(2):
        other = build_train_loader(small_shards, micro_batch_size=4, dp_rank=rank, dp_size=2, num_workers=0)
        take(other, 3 * n // 4)
        assert other.epoch >= 2
    different_seed = build_train_loader(small_shards, micro_batch_size=1, num_workers=0, seed=4)
    assert [key(b[0]) for b in take(different_seed, n)] != epoch0


def test_pipe_and_http_urls_give_the_same_stream(small_shards):
    import functools
    import http.server
    import threading

    def first_batches(source, **kw):
        loader = build_train_loader(source, micro_batch_size=4, num_workers=1, seed=2, **kw)
        batches = take(loader, 12)
        loader.close()
        return batches

    local = first_batches(small_shards)
    piped = first_batches(small_shards, shard_base=f"pipe:cat {small_shards}/")
    assert all(torch.equal(a, b) for a, b in zip(local, piped))
    piped_manifest = first_batches(f"pipe:cat {small_shards}/manifest.json")
    assert all(torch.equal(a, b) for a, b in zip(local, piped_manifest))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(small_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        served = first_batches(f"http://127.0.0.1:{server.server_port}/manifest.json")
    finally:
        server.shutdown()
    assert all(torch.equal(a, b) for a, b in zip(local, served))
    with pytest.raises(ValueError, match="not a folder URL"):
        build_train_loader(f"http://127.0.0.1:{server.server_port}/", micro_batch_size=4)


def test_eval_batches_are_one_deterministic_pass_split_evenly_by_rank(small_shards):
    m = load_manifest(small_shards)
    single = torch.cat(list(eval_batches(small_shards, micro_batch_size=8)))
    assert single.shape == (m.num_samples, 16)
    per_rank = [list(eval_batches(small_shards, micro_batch_size=8, dp_rank=r, dp_size=3)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # same batch count on every rank: collectives stay in step
    assert [[x.shape for x in b] for b in per_rank][0] == [x.shape for x in per_rank[1]]
    joined = torch.cat([torch.cat(b) for b in per_rank])
    assert torch.equal(joined, single[: len(joined)]) and len(joined) == m.num_samples // 3 * 3
    capped = list(eval_batches(small_shards, micro_batch_size=8, dp_rank=1, dp_size=3, max_batches=2))
    assert len(capped) == 2 and torch.equal(torch.cat(capped), torch.cat(per_rank[1])[:16])


def test_resume_in_a_fresh_process(small_shards, tmp_path):
    import subprocess
    import sys

    def build():
        return build_train_loader(small_shards, micro_batch_size=4, num_workers=2, seed=9)

    reference = build()
    full = take(reference, 30)
    reference.close()
    first = build()
    take(first, 12)
    (tmp_path / "state.json").write_text(json.dumps(first.state_dict()))
    first.close()
    code = (
        "import json, sys, torch; from loom.data.loader import build_train_loader; "
        "loader = build_train_loader(sys.argv[1], micro_batch_size=4, num_workers=2, seed=9); "
        "loader.load_state_dict(json.load(open(sys.argv[2]))); "
        "torch.save([next(loader) for _ in range(18)], sys.argv[3]); loader.close()"
    )
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", code, str(small_shards), str(tmp_path / "state.json"), str(tmp_path / "tail.pt")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    tail = torch.load(tmp_path / "tail.pt")
    assert all(torch.equal(a, b) for a, b in zip(full[12:], tail)) and len(tail) == 18


def _rank_stream(rank, world_size, shard_dir, steps_after_epoch):
    """In a real gloo process group: one epoch of this rank's samples, then lock-step training steps."""
    import torch.distributed as dist

    loader = build_train_loader(
        shard_dir, micro_batch_size=1, dp_rank=rank, dp_size=world_size, num_workers=0, seed=21
    )  # harness ranks are daemonic: no workers
    m = load_manifest(shard_dir)
    count = sum(m.shards[i].nsamples for i in loader.dataset.stream_shards(0, rank, world_size))
    epoch = [key(next(loader)[0]) for _ in range(count)]
    for _ in range(steps_after_epoch):  # uneven epochs: every rank still has a batch for every collective
        batch = next(loader)
        dist.all_reduce(torch.tensor([float(batch.sum())]))
    loader.close()
    return epoch, count


@pytest.mark.distributed
def test_ranks_in_a_process_group_cover_the_epoch_and_never_run_dry(small_shards):
    from tests.harness import run_distributed

    results = run_distributed(_rank_stream, 2, str(small_shards), 150, timeout=120)
    seen = Counter(k for epoch, _ in results for k in epoch)
    assert seen == all_samples(small_shards)


def test_eval_batches_check_arguments_before_the_first_batch(small_shards, tmp_path):
    with pytest.raises(ValueError, match="dp_rank=2"):
        eval_batches(small_shards, 4, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="seq_length"):
        eval_batches(small_shards, 4, seq_length=99)
    with pytest.raises(FileNotFoundError):
        eval_batches(tmp_path, 4)
