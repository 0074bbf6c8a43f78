"""The GPU check's training data: a SentencePiece tokenizer and train/val shards, made with Loom's own
CLI (`loom tokenizer train`, `loom preprocess`).

The GPU machine has no network, and Loom's built-in corpora are downloaded from Debian/PyPI. So
`launch/scripts/gpu_wheels.sh` runs `python -m tests.gpu.gpu_data .gpu-data` here (the built-in
shakespeare corpus, vocab 8192, seq 512: about 4 MiB) and the folder travels with the working tree.
Without it (and in the CPU dry run) the check writes a small generated corpus instead (`--synthetic`):
plausible word sequences, enough for a tokenizer and a few hundred samples, built in seconds.

`info.json` in the folder names the tokenizer, the train and val manifests, the vocabulary and the
sequence length the shards were cut for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

WORDS = (
    "the of and to in is that it for on with as was by this be are from at an or which kernel memory page "
    "process thread driver device cache lock queue buffer sample token model layer weight gradient step "
    "rank shard stream data text file system user time value state error signal network packet table "
    "king queen lord love night day heart death sweet fair good great speak hear know come make give"
).split()


def synthetic_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-ish word draws in sentences, so a BPE tokenizer has structure to learn."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    docs = []
    for d in range(count):
        sentences = []
        for _ in range(rng.randint(4, 14)):
            words = rng.choices(WORDS, weights=weights, k=rng.randint(5, 18))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
        docs.append(f"Section {d}. " + " ".join(sentences))
    return docs


def _loom(args: list[str]) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "loom.launch.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"loom {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")


def prepare(
    out: str | os.PathLike,
    synthetic: bool = False,
    corpus: str = "shakespeare",
    vocab_size: int = 8192,
    seq_length: int = 512,
    documents: int = 400,
) -> dict:
    """Tokenizer and shards in `out` (reused when `info.json` already matches); returns the info."""
    out = Path(out).resolve()
    info_path = out / "info.json"
    source = f"generated ({documents} documents)" if synthetic else f"built-in corpus {corpus}"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (info.get("source"), info.get("vocab_size"), info.get("seq_length")) == (source, vocab_size, seq_length):
            return load_info(out)
    out.mkdir(parents=True, exist_ok=True)
    if synthetic:
        text = out / "corpus.jsonl"
        text.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents(documents)))
        inputs = ["--input", str(text)]
    else:
        inputs = ["--corpus", corpus]
    _loom(["tokenizer", "train", *inputs, "--vocab-size", str(vocab_size), "--out", str(out / "tokenizer")])
    _loom(
        [
            "preprocess",
            *inputs,
            "--tokenizer",
            str(out / "tokenizer.model"),
            "--out",
            str(out / "shards"),
            "--seq-length",
            str(seq_length),
            "--samples-per-shard",
            "64",
            "--val-percent",
            "5",
            "--quiet",
        ]
    )
    if synthetic:
        (out / "corpus.jsonl").unlink()
    info = {
        "source": source,
        "tokenizer": "tokenizer.model",
        "train": "shards/train/manifest.json",
        "val": "shards/val/manifest.json",
        "vocab_size": vocab_size,
        "seq_length": seq_length,
    }
    info_path.write_text(json.dumps(info, indent=1))
    return load_info(out)


def load_info(folder: str | os.PathLike) -> dict:
    """`info.json` of a data folder with its paths made absolute (the folder may have been carried
    to another machine); raises FileNotFoundError when a file is missing."""
    folder = Path(folder).resolve()
    info = json.loads((folder / "info.json").read_text())
    for key in ("tokenizer", "train", "val"):
        info[key] = str(folder / info[key])
        if not Path(info[key]).is_file():
            raise FileNotFoundError(f"{folder}: {info[key]} is missing")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (e.g. .gpu-data)")
    p.add_argument("--synthetic", action="store_true", help="a generated corpus instead of a built-in one")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-length", type=int, default=512)
    args = p.parse_args(argv)
    info = prepare(args.out, args.synthetic, args.corpus, args.vocab_size, args.seq_length)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
