"""Every checkpoint folder ends with MANIFEST.json: the size and sha256 of each file in it, written
last, so a folder with a valid manifest was completely written and has not been damaged since.
It detects damage, not malice — see `launch.checkpoint.unpickle` for what protects against that."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loom.data.tokenizer import sha256_file
from loom.launch.checkpoint.layout import MANIFEST


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files, "written": time.time()}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path, hashes: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "MANIFEST.json is unreadable"
    for rel, info in files.items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != info["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {info['bytes']}"
        if hashes and sha256_file(path) != info["sha256"]:
            return f"{rel} fails its sha256 check"
    return None
