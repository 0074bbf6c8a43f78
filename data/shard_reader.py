"""Read one token shard whole and verify it against its manifest entry.

The shard is read into memory (the loader permutes samples inside it anyway), so the sha256 and
sample count are checked for every source, local files, `pipe:` commands and http(s) URLs alike.
A tar has no payload checksum and random bytes over a header end a tar silently, so the hash is
what catches damage; the count and sample sizes are checked as well, for manifests without hashes.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import webdataset as wds

from loom.data.manifest import Manifest, ShardInfo


class CorruptShardError(RuntimeError):
    """A shard could not be read, or its bytes/samples disagree with the manifest.

    Built from one message so DataLoader workers can re-raise it in the main process as is. The main
    process's copy arrives wrapped in torch's "Caught ... Original Traceback ..." text; the constructor
    keeps the message alone, so the CLI prints one `error:` line.
    """

    def __init__(self, message: str):
        super().__init__(message.rsplit("CorruptShardError: ", 1)[-1].strip())


def _corrupt(name: str, reason: str) -> CorruptShardError:
    return CorruptShardError(f"corrupt shard {name}: {reason}")


def _read_bytes(url: str, name: str) -> bytes:
    try:
        stream = wds.gopen(url, "rb")
        try:
            return stream.read()
        finally:
            stream.close()  # for pipe:/http this waits for the command and raises on a non-zero exit
    except Exception as exc:  # noqa: BLE001 - any I/O failure makes the shard unusable
        raise _corrupt(name, f"cannot be read from {url}: {type(exc).__name__}: {exc}") from None


def read_shard(url: str, info: ShardInfo, manifest: Manifest) -> np.ndarray:
    """The shard's samples as an array [nsamples, seq_length + 1] of the manifest's dtype."""
    data = _read_bytes(url, info.name)
    if info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256:
        raise _corrupt(
            info.name,
            f"sha256 differs from the manifest ({len(data)} bytes read, {info.nbytes} expected): truncated or damaged",
        )
    key, nbytes = manifest.sample_key, manifest.sample_nbytes
    payloads = []
    try:
        members = wds.tariterators.tar_file_expander(
            [{"url": url, "stream": io.BytesIO(data)}], handler=wds.reraise_exception
        )
        for sample in wds.tariterators.group_by_keys(members, handler=wds.reraise_exception):
            payload = sample.get(key)
            if payload is None or len(payload) != nbytes:
                raise ValueError(f"sample {sample.get('__key__')!r} has no {nbytes}-byte {key!r} member")
            payloads.append(payload)
    except Exception as exc:  # noqa: BLE001 - tarfile raises several types for damaged archives
        raise _corrupt(info.name, f"unreadable tar after {len(payloads)} samples: {exc}") from None
    if len(payloads) != info.nsamples:
        raise _corrupt(info.name, f"{len(payloads)} samples read, manifest says {info.nsamples}")
    dtype = np.dtype("<u2" if manifest.dtype == "uint16" else "<u4")
    return np.frombuffer(b"".join(payloads), dtype=dtype).reshape(len(payloads), manifest.sample_length)
