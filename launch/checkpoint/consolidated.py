"""The consolidated format: full, layout-free weights, the common currency of every conversion.

    consolidated.safetensors   fp32 weights named as in a TP=1, PP=1 model; vocabulary rows cut to
                               model.vocab_size (no TP padding); a tied output copy is dropped;
                               technique parameters and SCA's heads and field buffers are kept
                               (SCA is training-only; exports drop it)
    optimizer.safetensors      optional: `exp_avg.<name>` / `exp_avg_sq.<name>` for every weight
    consolidated.json          format marker, model + techniques + full run config, trainer state,
                               source layout, optimizer step, tokenizer sha256
    tokenizer.model            the run's SentencePiece model (when the checkpoint has one)
    meta.json, MANIFEST.json   so `loom train --resume FOLDER` accepts the folder as a start point

`read_deepspeed` produces a `Consolidated` from a DeepSpeed checkpoint of any layout, `reader.load`
from either kind of folder; `start_point` slices one into any TP×PP×DP×ZeRO layout for training; the
converters in `launch/convert/` write Hugging Face folders from it and back. Only safetensors and JSON
are read here: a consolidated folder can never run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import (
    CONSOLIDATED_INFO,
    CONSOLIDATED_OPTIMIZER,
    CONSOLIDATED_WEIGHTS,
    META,
    TOKENIZER,
)
from loom.launch.checkpoint.manifest import write_manifest

FORMAT = "loom-consolidated"
FORMAT_VERSION = 1
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------------------------- the data
@dataclass
class Consolidated:
    """Full, layout-free weights of one model plus what is needed to rebuild or export it."""

    weights: dict[str, torch.Tensor]
    """fp32 parameters and persistent buffers, TP=1/PP=1 names, vocabulary rows = vocab_size."""
    run_config: dict
    """The full resolved RunConfig dict the weights were trained with."""
    state: dict = field(default_factory=dict)
    """Trainer state (step, consumed_tokens, …) at the checkpoint."""
    source: dict = field(default_factory=dict)
    """Where the weights came from (checkpoint path, layout, ZeRO stage, …)."""
    optimizer: dict[str, dict[str, torch.Tensor]] | None = None
    """{"exp_avg": {name: tensor}, "exp_avg_sq": {…}}, same shapes as the weights, or None."""
    optimizer_step: float | None = None
    """Adam's step count (bias correction) when `optimizer` is present."""
    tokenizer: Path | None = None
    """The SentencePiece model file, if any."""
    notes: list = field(default_factory=list)
    """One-line remarks for the user (e.g. precision of a ZeRO-0 bf16 checkpoint)."""

    @property
    def model(self):
        from loom.launch.config import model_config_from_saved

        return model_config_from_saved(self.run_config.get("model"))

    @property
    def techniques(self):
        from loom.launch.config import techniques_from_saved

        return techniques_from_saved(self.run_config.get("techniques"))

    def tokenizer_sha256(self) -> str | None:
        if self.tokenizer is None:
            return None
        from loom.data.tokenizer import sha256_file

        return sha256_file(self.tokenizer)


# ------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def output_folder(out: str | os.PathLike, force: bool = False):
    """Write into a temporary sibling and rename at the end, so a failure leaves no half folder."""
    final = Path(out)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        if not force:
            raise ConvertError(f"{out} already exists; choose a new folder or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    out = {}
    for name, value in tensors.items():
        t = value.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()  # safetensors refuses shared storage
        seen[t.data_ptr()] = name
        out[name] = t
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o644)


def write_consolidated(data: Consolidated, folder: Path, kind: str = "consolidate", extra: dict | None = None) -> None:
    """Write `data` into an (empty) folder in the consolidated format, with meta.json and a manifest."""
    weights = {k: v.float() if v.is_floating_point() else v for k, v in data.weights.items()}
    save_safetensors(weights, folder / CONSOLIDATED_WEIGHTS, {"loom": FORMAT})
    has_opt = data.optimizer is not None
    if has_opt:
        flat = {f"{key}.{name}": t.float() for key, group in data.optimizer.items() for name, t in group.items()}
        save_safetensors(flat, folder / CONSOLIDATED_OPTIMIZER, {"loom": FORMAT})
    tokenizer_sha = None
    if data.tokenizer is not None:
        shutil.copyfile(data.tokenizer, folder / TOKENIZER)
        tokenizer_sha = data.tokenizer_sha256()
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "written": time.time(),
        "vocab_rows": "vocab_size (no tensor-parallel padding)",
        "model": data.run_config.get("model", {}),
        "techniques": data.run_config.get("techniques", {}),
        "config": data.run_config,
        "state": data.state,
        "source": data.source,
        "optimizer": {"step": data.optimizer_step, "keys": list(OPTIMIZER_KEYS)} if has_opt else None,
        "tokenizer_sha256": tokenizer_sha,
        **(extra or {}),
    }
    (folder / CONSOLIDATED_INFO).write_text(json.dumps(info, indent=1, default=str))
    meta = {
        "state": data.state,
        "config": data.run_config,
        "start_point": True,
        "world_size": None,
        "layout": None,
        "source": data.source,
    }
    (folder / META).write_text(json.dumps(meta, indent=1, default=str))
    write_manifest(folder)


def read_consolidated(folder: str | os.PathLike, optimizer: bool = False) -> Consolidated:
    from safetensors.torch import load_file

    p = Path(folder)
    try:
        info = json.loads((p / CONSOLIDATED_INFO).read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{p / CONSOLIDATED_INFO} is missing or unreadable") from None
    if info.get("format") != FORMAT:
        raise ConvertError(f"{p} is not a Loom consolidated folder (format {info.get('format')!r})")
    if not (p / CONSOLIDATED_WEIGHTS).is_file():
        raise ConvertError(f"{p} has no {CONSOLIDATED_WEIGHTS}")
    try:
        weights = load_file(str(p / CONSOLIDATED_WEIGHTS))
    except Exception as exc:
        raise ConvertError(f"cannot read {p / CONSOLIDATED_WEIGHTS}: {str(exc).splitlines()[0]}") from None
    opt = None
    step = None
    if optimizer and (p / CONSOLIDATED_OPTIMIZER).is_file() and info.get("optimizer"):
        flat = load_file(str(p / CONSOLIDATED_OPTIMIZER))
        opt = {key: {} for key in OPTIMIZER_KEYS}
        for full, tensor in flat.items():
            key, name = full.split(".", 1)
            opt.setdefault(key, {})[name] = tensor
        step = info["optimizer"].get("step")
    tok = p / TOKENIZER
    run_config = info.get("config") or {"model": info.get("model", {}), "techniques": info.get("techniques", {})}
    return Consolidated(
        weights=weights,
        run_config=run_config,
        state=dict(info.get("state") or {}),
        source=dict(info.get("source") or {}),
        optimizer=opt,
        optimizer_step=step,
        tokenizer=tok if tok.is_file() else None,
    )
