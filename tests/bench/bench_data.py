"""Data pipeline benchmark (a script, not a test): tokenizer training, tokenization, loader throughput.

    .venv/bin/python tests/bench/bench_data.py [--corpus linuxdoc] [--vocab-size 8192] [--seq-length 1023]

Prints a markdown table. Wall times on a shared machine are noisy; the load average is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a plain script from anywhere

from loom.data.corpora import ensure_corpus  # noqa: E402
from loom.data.loader import build_train_loader  # noqa: E402
from loom.data.manifest import load_manifest  # noqa: E402
from loom.data.shards import preprocess  # noqa: E402
from loom.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402


def bench_tokenizer_training(corpus: Path, prefix: Path, vocab_size: int, model_type: str) -> tuple[Path, float]:
    start = time.perf_counter()
    model = train_tokenizer(corpus, prefix, vocab_size=vocab_size, model_type=model_type)
    return model, time.perf_counter() - start


def bench_preprocess(corpus: Path, model: Path, out: Path, seq_length: int, workers: int) -> tuple[int, float]:
    start = time.perf_counter()
    manifests = preprocess(
        corpus, model, out, seq_length=seq_length, samples_per_shard=256, num_workers=workers, progress=False
    )
    seconds = time.perf_counter() - start
    m = load_manifest(manifests["train"])
    return m.num_tokens + m.dropped_tokens, seconds


def bench_loader(shards: Path, micro_batch_size: int, num_workers: int, batches: int) -> tuple[int, float, float]:
    loader = build_train_loader(shards, micro_batch_size, num_workers=num_workers, seed=0)
    start = time.perf_counter()
    first = next(loader)
    first_batch_s = time.perf_counter() - start
    tokens = first.numel()
    for _ in range(batches - 1):
        tokens += next(loader).numel()
    seconds = time.perf_counter() - start
    loader.close()
    return tokens, seconds, first_batch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="linuxdoc")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--seq-length", type=int, default=1023)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=1500)
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary folder)")
    args = parser.parse_args()

    corpus = ensure_corpus(args.corpus)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(args.workdir or tmp)
        rows = []
        model, seconds = bench_tokenizer_training(corpus, work / "tok" / args.corpus, args.vocab_size, args.model_type)
        mb = corpus.stat().st_size / 1e6
        rows.append(
            (
                f"train SentencePiece {args.model_type} {Tokenizer(model).vocab_size}",
                f"{seconds:.1f} s",
                f"{mb / seconds:.1f} MB/s of JSONL",
            )
        )
        for workers in (1, 2):
            tokens, seconds = bench_preprocess(corpus, model, work / f"shards{workers}", args.seq_length, workers)
            rows.append(
                (
                    f"preprocess (tokenize + pack + write), {workers} process{'es' if workers > 1 else ''}",
                    f"{seconds:.1f} s",
                    f"{tokens / seconds / 1e6:.2f} M tok/s ({tokens / 1e6:.2f} M tokens)",
                )
            )
        for workers in (0, 1, 2):
            tokens, seconds, first = bench_loader(work / "shards1", args.micro_batch_size, workers, args.loader_batches)
            rows.append(
                (
                    f"loader, num_workers={workers}, {args.loader_batches} x [{args.micro_batch_size}, "
                    f"{args.seq_length + 1}]",
                    f"{seconds:.1f} s",
                    f"{tokens / seconds / 1e6:.2f} M tok/s (first batch {first:.2f} s)",
                )
            )

    print(
        f"\ncorpus `{args.corpus}` ({mb:.1f} MB JSONL), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| step | time | throughput |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
