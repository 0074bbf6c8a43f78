"""The manifest of a shard set: what was written, with which tokenizer, and how to check it.

`manifest.json` sits next to its shards. Shard names are relative to the manifest's location,
which may be a local folder, an http(s) URL or a `pipe:` command ending in the manifest's path;
`shard_base` redirects them to any prefix, e.g. "pipe:curl -sf https://host/set/" or "pipe:cat /mnt/set/".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

MANIFEST_NAME = "manifest.json"
FORMAT = "loom-token-shards"
VERSION = 1


@dataclass
class ShardInfo:
    name: str
    nsamples: int
    sha256: str
    nbytes: int


@dataclass
class Manifest:
    seq_length: int
    dtype: str
    """numpy dtype name of the stored token ids: "uint16", or "uint32" when vocab_size >= 65536."""
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    tokenizer_file: str
    num_documents: int
    num_samples: int
    num_tokens: int
    dropped_tokens: int
    """Tokens after the last full sample, not stored."""
    split: str
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION
    location: str = field(default="", compare=False)
    """Folder or URL prefix the manifest was loaded from (not stored)."""

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1

    @property
    def sample_key(self) -> str:
        return "tokens.u16" if self.dtype == "uint16" else "tokens.u32"

    @property
    def sample_nbytes(self) -> int:
        return self.sample_length * (2 if self.dtype == "uint16" else 4)

    def fingerprint(self) -> dict[str, Any]:
        """What a saved loader state must agree with to be restored into a loader over this set."""
        shards = hashlib.sha256("".join(f"{s.name}:{s.sha256};" for s in self.shards).encode()).hexdigest()
        return {"tokenizer_sha256": self.tokenizer_sha256[:16], "seq_length": self.seq_length, "shards": shards[:16]}

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("location")
        return json.dumps(data, indent=1) + "\n"

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://", "pipe:", "file:"))


def _read_text(location: str) -> str:
    if _is_url(location):
        with wds.gopen(location, "rb") as f:
            return f.read().decode("utf-8")
    return Path(location).read_text(encoding="utf-8")


def resolve_manifest_path(source: str | os.PathLike, split: str = "train") -> str:
    """`source` may be a manifest, a folder holding one, or a folder with `<split>/manifest.json`."""
    source = str(source)
    if _is_url(source):
        if source.endswith("/"):  # webdataset treats a URL ending in "/" as a work-queue folder and renames files
            raise ValueError(f"give the manifest URL itself, not a folder URL: {source!r}")
        return source
    path = Path(source)
    if path.is_dir():
        for candidate in (path / MANIFEST_NAME, path / split / MANIFEST_NAME):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {source!r} (nor in {split}/): run `loom preprocess` first")
    if not path.is_file():
        raise FileNotFoundError(f"shard manifest {source!r} does not exist")
    return str(path)


def load_manifest(source: str | os.PathLike, split: str = "train") -> Manifest:
    location = resolve_manifest_path(source, split)
    try:
        data = json.loads(_read_text(location))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{location}: not a valid manifest ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{location}: not a Loom shard manifest (format {data.get('format') if isinstance(data, dict) else None!r})"
        )
    if data.get("version") != VERSION:
        raise ValueError(f"{location}: manifest version {data.get('version')} is not supported (expected {VERSION})")
    shards = [ShardInfo(**s) for s in data.pop("shards")]
    manifest = Manifest(**data, shards=shards)
    manifest.location = location.rsplit("/", 1)[0] if _is_url(location) else str(Path(location).parent)
    return manifest


def shard_urls(manifest: Manifest, shard_base: str | None = None) -> list[str]:
    """Where each shard is read from: `shard_base + name`, or next to the manifest."""
    if shard_base is not None:
        urls = [shard_base + s.name for s in manifest.shards]
    elif _is_url(manifest.location):
        urls = [f"{manifest.location}/{s.name}" for s in manifest.shards]
    else:
        urls = [str(Path(manifest.location) / s.name) for s in manifest.shards]
    for url in urls:
        if url.endswith("/"):
            raise ValueError(f"shard URL {url!r} ends with '/': it must name a .tar file")
    return urls


def check_compatible(
    manifest: Manifest,
    *,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    seq_length: int | None = None,
    vocab_padding_multiple: int = 1,
) -> None:
    """Raise ValueError with a clear message when the shards cannot feed the given tokenizer/model.

    `vocab_size` is the model's embedding size; it must equal the tokenizer's vocabulary, or that
    size rounded up to `vocab_padding_multiple` when the model pads its vocabulary.
    """
    where = manifest.location or "the shard set"
    if not manifest.shards or manifest.num_samples == 0:
        raise ValueError(
            f"{where}: the shard set is empty (0 samples); the input had fewer than "
            f"seq_length+1 = {manifest.sample_length} tokens or no documents"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest.tokenizer_sha256:
        raise ValueError(
            f"{where}: shards were built with a different tokenizer (sha256 "
            f"{manifest.tokenizer_sha256[:12]}…, this run uses {tokenizer_sha256[:12]}…); "
            f"re-run `loom preprocess` with this tokenizer or use the shards' own tokenizer.model"
        )
    if vocab_size is not None:
        multiple = max(1, vocab_padding_multiple)
        padded = -(-manifest.vocab_size // multiple) * multiple
        if vocab_size not in (manifest.vocab_size, padded):
            raise ValueError(
                f"{where}: model vocab_size={vocab_size} does not match the tokenizer's vocabulary "
                f"of {manifest.vocab_size} (padded to a multiple of {multiple}: {padded})"
            )
    if seq_length is not None and seq_length != manifest.seq_length:
        raise ValueError(
            f"{where}: shards hold samples of seq_length={manifest.seq_length} (+1 token) but the run "
            f"asks for seq_length={seq_length}; re-run `loom preprocess --seq-length {seq_length}`"
        )
