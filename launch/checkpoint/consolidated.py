"""`loom convert`: read a Loom checkpoint of any layout offline and write layout-free weights.

`launch.convert_read` merges a checkpoint's DeepSpeed files (every TP×PP×DP×ZeRO layout).

The result is a *consolidated folder* ("start point"), the common currency of every conversion:

    consolidated.safetensors   fp32 weights named as in a TP=1, PP=1 model; vocabulary rows cut to
                               model.vocab_size (no TP padding); a tied output copy is dropped;
                               technique parameters and SCA's heads and field buffers are kept
                               (SCA is training-only; exports drop it)
    optimizer.safetensors      optional: `exp_avg.<name>` / `exp_avg_sq.<name>` for every weight
    consolidated.json          format marker, model + techniques + full run config, trainer state,
                               source layout, optimizer step, tokenizer sha256
    tokenizer.model            the run's SentencePiece model (when the checkpoint has one)
    meta.json, MANIFEST.json   so `loom train --resume FOLDER` accepts the folder (see
                               `launch.convert_layout.load_start_point`)

`launch.convert_hf` turns it into Hugging Face formats and back; `launch.convert_layout` slices it
into any TP×PP×DP×ZeRO layout for training.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT = "loom-consolidated"
FORMAT_VERSION = 1
WEIGHTS_FILE = "consolidated.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
INFO_FILE = "consolidated.json"
TOKENIZER_FILE = "tokenizer.model"
OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")

_COLUMN_PARALLEL = re.compile(
    r"^(embedding\.weight|output_layer\.weight|layers\.\d+\.attention\.qkv\.weight"
    r"|layers\.\d+\.mlp\.gate_up\.weight)$"
)
_ROW_PARALLEL = re.compile(r"^layers\.\d+\.(attention\.proj|mlp\.down)\.weight$")
VOCAB_WEIGHTS = ("embedding.weight", "output_layer.weight")
_TECHNIQUE_PART = re.compile(r"(^|\.)(lcm|scr|reweave|capture|sca)\.")
_TRAINING_ONLY_PART = re.compile(r"(^|\.)sca\.")


class ConvertError(ValueError):
    """A conversion cannot proceed; the message is one line for the user (the CLI prints it)."""


# ------------------------------------------------------------------------------------- names
def partition_dim(name: str) -> Optional[int]:
    """Tensor-parallel partition dimension of a weight by its TP=1 name, None if replicated."""
    if _COLUMN_PARALLEL.match(name):
        return 0
    if _ROW_PARALLEL.match(name):
        return 1
    return None


def is_technique_name(name: str) -> bool:
    """LCM, SCR, CMR (reweave/capture) and SCA parameters and buffers."""
    return bool(_TECHNIQUE_PART.search(name))


def is_training_only(name: str) -> bool:
    """SCA heads and field buffers: they never touch the forward pass, so exports drop them."""
    return bool(_TRAINING_ONLY_PART.search(name))


# ------------------------------------------------------------------------------------- configs
def _filter_known(tree: Any, cls) -> Any:
    """Drop keys a (possibly newer or older) config dict has that this schema lacks."""
    from dataclasses import fields, is_dataclass

    if not isinstance(tree, dict) or not is_dataclass(cls):
        return tree
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in tree.items():
        if key not in known:
            continue
        f = known[key]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        out[key] = _filter_known(value, type(default)) if is_dataclass(default) else value
    return out


def run_config_from_dict(config: dict):
    """The RunConfig a checkpoint was trained with (meta.json "config"), tolerant of schema drift."""
    from omegaconf import OmegaConf

    from loom.launch.config import RunConfig

    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, OmegaConf.create(_filter_known(config, RunConfig)))
        return OmegaConf.to_object(merged)
    except Exception as exc:  # OmegaConf validation errors
        raise ConvertError(f"the checkpoint's config cannot be read: {str(exc).splitlines()[0]}") from None


def model_config_from_dict(d: dict):
    from loom.model.config import ModelConfig

    return ModelConfig(**_filter_known(d, ModelConfig))


def techniques_from_dict(d: dict | None):
    from omegaconf import OmegaConf

    from loom.techniques.config import TechniquesConfig

    if not d:
        return TechniquesConfig()
    merged = OmegaConf.merge(
        OmegaConf.structured(TechniquesConfig), OmegaConf.create(_filter_known(d, TechniquesConfig))
    )
    return OmegaConf.to_object(merged)


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Full (TP=1, unpadded vocabulary) shapes of the core weights of a model config."""
    d, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (cfg.vocab_size, d), "final_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["output_layer.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attention.qkv.weight"] = ((cfg.num_heads + 2 * cfg.kv_heads) * hd, d)
        shapes[p + "attention.proj.weight"] = (d, cfg.num_heads * hd)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.gate_up.weight"] = (2 * cfg.ffn_size, d)
        shapes[p + "mlp.down.weight"] = (d, cfg.ffn_size)
    return shapes


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
    optimizer: Optional[dict[str, dict[str, torch.Tensor]]] = None
    """{"exp_avg": {name: tensor}, "exp_avg_sq": {…}}, same shapes as the weights, or None."""
    optimizer_step: Optional[float] = None
    """Adam's step count (bias correction) when `optimizer` is present."""
    tokenizer: Optional[Path] = None
    """The SentencePiece model file, if any."""
    notes: list = field(default_factory=list)
    """One-line remarks for the user (e.g. precision of a ZeRO-0 bf16 checkpoint)."""

    @property
    def model(self):
        return model_config_from_dict(self.run_config.get("model", {}))

    @property
    def techniques(self):
        return techniques_from_dict(self.run_config.get("techniques"))

    def tokenizer_sha256(self) -> Optional[str]:
        if self.tokenizer is None:
            return None
        from loom.data.tokenizer import sha256_file

        return sha256_file(self.tokenizer)


# ------------------------------------------------------------------------------------- locating
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint step folder, a run directory (newest complete checkpoint), its `checkpoints/`
    folder, or a consolidated folder; verified against its manifest. Raises ConvertError."""
    from loom.launch.checkpoint import store as ckpt

    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if not p.is_dir():
        raise ConvertError(f"{path} is a file; expected a checkpoint folder (…/checkpoints/step_N) or a run directory")
    if any((p / marker).exists() for marker in (INFO_FILE, "meta.json", ckpt.MANIFEST, "ds")):
        problem = ckpt.verify(p)
        if problem is not None:
            raise ConvertError(f"{p} is not a complete checkpoint: {problem}")
        return p
    root = p if p.name == ckpt.CHECKPOINTS else p / ckpt.CHECKPOINTS
    if root.is_dir():
        skipped: list[str] = []
        found = ckpt.find_resumable(root.parent, log=skipped.append)
        if found is not None:
            return found
        detail = f" ({skipped[0].replace('warning: ', '')})" if skipped else ""
        raise ConvertError(f"{path} has no complete checkpoint{detail}")
    raise ConvertError(f"{path} is neither a Loom checkpoint (no meta.json / MANIFEST.json) nor a run directory")


def is_consolidated(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return (p / INFO_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


# ------------------------------------------------------------------------------------- reading
def load(path: str | os.PathLike, optimizer: bool = False, log=None) -> Consolidated:
    """Full weights (and optionally Adam state) from a checkpoint folder or a consolidated folder."""
    folder = resolve_checkpoint(path)
    if is_consolidated(folder):
        return read_consolidated(folder, optimizer=optimizer)
    from loom.launch.checkpoint.read_deepspeed import read_checkpoint

    return read_checkpoint(folder, optimizer=optimizer, log=log)


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
    from loom.launch.checkpoint import store as ckpt

    weights = {k: v.float() if v.is_floating_point() else v for k, v in data.weights.items()}
    save_safetensors(weights, folder / WEIGHTS_FILE, {"loom": FORMAT})
    has_opt = data.optimizer is not None
    if has_opt:
        flat = {f"{key}.{name}": t.float() for key, group in data.optimizer.items() for name, t in group.items()}
        save_safetensors(flat, folder / OPTIMIZER_FILE, {"loom": FORMAT})
    tokenizer_sha = None
    if data.tokenizer is not None:
        shutil.copyfile(data.tokenizer, folder / TOKENIZER_FILE)
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
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    meta = {
        "state": data.state,
        "config": data.run_config,
        "start_point": True,
        "world_size": None,
        "layout": None,
        "source": data.source,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    ckpt.write_manifest(folder)


def read_consolidated(folder: str | os.PathLike, optimizer: bool = False) -> Consolidated:
    from safetensors.torch import load_file

    p = Path(folder)
    try:
        info = json.loads((p / INFO_FILE).read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{p / INFO_FILE} is missing or unreadable") from None
    if info.get("format") != FORMAT:
        raise ConvertError(f"{p} is not a Loom consolidated folder (format {info.get('format')!r})")
    if not (p / WEIGHTS_FILE).is_file():
        raise ConvertError(f"{p} has no {WEIGHTS_FILE}")
    try:
        weights = load_file(str(p / WEIGHTS_FILE))
    except Exception as exc:
        raise ConvertError(f"cannot read {p / WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from None
    opt = None
    step = None
    if optimizer and (p / OPTIMIZER_FILE).is_file() and info.get("optimizer"):
        flat = load_file(str(p / OPTIMIZER_FILE))
        opt = {key: {} for key in OPTIMIZER_KEYS}
        for full, tensor in flat.items():
            key, name = full.split(".", 1)
            opt.setdefault(key, {})[name] = tensor
        step = info["optimizer"].get("step")
    tok = p / TOKENIZER_FILE
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


def consolidate(
    ckpt: str | os.PathLike, out: str | os.PathLike, optimizer: bool = False, force: bool = False, log=print
) -> Path:
    """`loom convert consolidate`: checkpoint (any layout) → consolidated folder."""
    data = load(ckpt, optimizer=optimizer, log=log)
    for note in data.notes:
        log(f"note: {note}")
    with output_folder(out, force) as tmp:
        write_consolidated(data, tmp, kind="consolidate")
    n = sum(t.numel() for name, t in data.weights.items() if not is_training_only(name))
    layout = data.source.get("layout") or {}
    log(
        f"consolidated {len(data.weights)} tensors ({n:,} model parameters, fp32) from "
        f"{data.source.get('checkpoint', ckpt)}"
        + (
            f" [TP {layout.get('tp')} × PP {layout.get('pp')} × DP {layout.get('dp')}, ZeRO-{layout.get('zero')}]"
            if layout
            else ""
        )
        + (" with optimizer state" if data.optimizer is not None else "")
        + f" → {out}"
    )
    return Path(out)
