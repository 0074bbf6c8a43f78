"""CLI wiring for `loom data`, `loom tokenizer` and `loom preprocess`.

Handlers take the argparse namespace and return an exit code. Bad input raises ValueError or
FileNotFoundError with a one-line message; the CLI's main prints it as `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import os
import time


def _add_source_args(parser: argparse.ArgumentParser, what: str, several: bool = False) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--corpus",
        metavar="NAME",
        nargs="+" if several else None,
        help=f"built-in corpus{'/corpora' if several else ''} to {what} (see `loom data list`)",
    )
    source.add_argument(
        "--input",
        metavar="PATH",
        nargs="+",
        help=".txt (one document per file), .jsonl or .jsonl.gz files, folders or globs",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", help="corpus cache (default $LOOM_CACHE/corpora or ~/.cache/loom/corpora)"
    )


def _inputs(args: argparse.Namespace) -> list[str]:
    from loom.data.corpora import ensure_corpus

    if args.corpus:
        names = args.corpus if isinstance(args.corpus, list) else [args.corpus]
        return [str(ensure_corpus(name, args.cache_dir)) for name in names]
    return list(args.input)


def cmd_data_list(args: argparse.Namespace) -> int:
    from loom.data.corpora import CORPORA, default_cache_dir

    cache = args.cache_dir or default_cache_dir()
    print(f"{'name':<12} {'source':<24} {'license':<36} {'built':<5} description")
    for corpus in CORPORA.values():
        built = "yes" if os.path.isfile(os.path.join(cache, f"{corpus.name}.jsonl")) else "no"
        print(
            f"{corpus.name:<12} {corpus.source:<24} {corpus.license:<36} {built:<5} "
            f"{corpus.description} ({corpus.role})"
        )
    print(f"cache: {cache}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from loom.data.corpora import ensure_corpus, get_corpus

    get_corpus(args.name)  # unknown names fail before any download
    start = time.perf_counter()
    path = ensure_corpus(args.name, args.cache_dir)
    with open(path, encoding="utf-8") as f:
        documents = sum(1 for _ in f)
    print(
        f"{args.name}: {documents} documents, {os.path.getsize(path) / 1e6:.1f} MB in {path} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from loom.data.tokenizer import Tokenizer, train_tokenizer

    start = time.perf_counter()
    model = train_tokenizer(
        _inputs(args),
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        num_threads=args.threads,
        input_sentence_size=args.sample_lines,
        input_weights=args.weights,
    )
    tok = Tokenizer(model)
    print(
        f"trained {args.model_type} tokenizer, vocab {tok.vocab_size}: {model} "
        f"(sha256 {tok.sha256[:12]}, {time.perf_counter() - start:.1f}s)"
    )
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from loom.data.corpora import expand_inputs, get_corpus
    from loom.data.manifest import load_manifest
    from loom.data.shards import preprocess
    from loom.data.tokenizer import Tokenizer

    # cheap checks first, each one `error:` line: the inputs exist (or the corpus is a built-in one), then the
    # tokenizer is a SentencePiece model, before any corpus download or tokenizing starts
    if args.corpus:
        get_corpus(args.corpus)
    else:
        expand_inputs(args.input)
    Tokenizer(args.tokenizer)
    start = time.perf_counter()
    manifests = preprocess(
        _inputs(args),
        args.tokenizer,
        args.out,
        seq_length=args.seq_length,
        samples_per_shard=args.samples_per_shard,
        num_workers=args.workers,
        val_percent=args.val_percent,
        progress=not args.quiet,
    )
    for split, path in manifests.items():
        m = load_manifest(path)
        print(
            f"{split}: {m.num_documents} documents -> {m.num_samples} samples x {m.sample_length} tokens "
            f"in {len(m.shards)} shards ({m.dtype}): {path}"
        )
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `data`, `tokenizer` and `preprocess` to the CLI's subparsers."""
    data = subparsers.add_parser("data", help="built-in text corpora")
    data_sub = data.add_subparsers(dest="data_command", metavar="{list,prepare}", required=True)
    listing = data_sub.add_parser("list", help="show the built-in corpora")
    listing.add_argument("--cache-dir", metavar="DIR")
    listing.set_defaults(func=cmd_data_list)
    prepare = data_sub.add_parser("prepare", help="download and extract a built-in corpus into the cache")
    prepare.add_argument("name", metavar="NAME")
    prepare.add_argument("--cache-dir", metavar="DIR")
    prepare.set_defaults(func=cmd_data_prepare)

    tokenizer = subparsers.add_parser("tokenizer", help="SentencePiece tokenizer")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="{train}", required=True)
    train = tok_sub.add_parser("train", help="train a SentencePiece model on text")
    _add_source_args(train, "train on", several=True)
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    train.add_argument("--sample-lines", type=int, default=0, help="train on this many sampled lines (0 = all)")
    train.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="one sampling weight per --input/--corpus argument: its share of the training lines (default: all once)",
    )
    train.set_defaults(func=cmd_tokenizer_train)

    pre = subparsers.add_parser("preprocess", help="tokenize text into packed .tar shards + manifest.json")
    _add_source_args(pre, "preprocess")
    pre.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model file")
    pre.add_argument("--out", required=True, metavar="DIR")
    pre.add_argument("--seq-length", type=int, required=True, help="tokens per sample is seq_length + 1")
    pre.add_argument(
        "--samples-per-shard",
        type=int,
        default=256,
        help="samples per .tar shard (enough shards for every rank x worker stream)",
    )
    pre.add_argument(
        "--val-percent",
        type=float,
        default=0.0,
        help="hold out this percent of documents (by crc32 of the text) into DIR/val",
    )
    pre.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_preprocess)
