"""`loom convert`: read a Loom checkpoint of any layout offline and write layout-free weights.

A checkpoint (`<run>/checkpoints/step_N/`, see `launch.checkpoint`) holds one DeepSpeed file set per
model-parallel rank: `ds/state/mp_rank_XX_model_states.pt` (ZeRO 0-2) or
`ds/state/zero_pp_rank_D_mp_rank_XX_{model,optim}_states.pt` (ZeRO-3), where the model-parallel
rank is megatron's rank in the TP×PP group, `XX = pp_rank * tp + tp_rank`. This module reads those
files directly — no process group, no GPU — and merges:

* ZeRO data-parallel partitions: the fp32 master weights (and, on request, Adam's `exp_avg`,
  `exp_avg_sq` and `step`) of ZeRO-1/2 via each partition's `param_slice_mappings`, of ZeRO-3 via
  its per-parameter `ceil(numel / dp)` partitions. ZeRO-0 has no master copy: its module weights
  (the working dtype) and its plain torch AdamW state are used.
* tensor-parallel shards along each weight's partition dimension: column-parallel weights
  (`attention.qkv`, `mlp.gate_up`) and the vocab-parallel `embedding` / `output_layer` along
  dim 0, row-parallel ones (`attention.proj`, `mlp.down`) along dim 1; everything else is
  replicated and taken from TP rank 0.
* pipeline stages: stage modules already use global names (`layers.7.…`), so stages just union.

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
import io
import json
import math
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

_COLUMN_PARALLEL = re.compile(r"^(embedding\.weight|output_layer\.weight|layers\.\d+\.attention\.qkv\.weight"
                              r"|layers\.\d+\.mlp\.gate_up\.weight)$")
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

    from launch.config import RunConfig

    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, OmegaConf.create(_filter_known(config, RunConfig)))
        return OmegaConf.to_object(merged)
    except Exception as exc:  # OmegaConf validation errors
        raise ConvertError(f"the checkpoint's config cannot be read: {str(exc).splitlines()[0]}") from None


def model_config_from_dict(d: dict):
    from model.config import ModelConfig

    return ModelConfig(**_filter_known(d, ModelConfig))


def techniques_from_dict(d: dict | None):
    from omegaconf import OmegaConf

    from techniques.config import TechniquesConfig

    if not d:
        return TechniquesConfig()
    merged = OmegaConf.merge(OmegaConf.structured(TechniquesConfig),
                             OmegaConf.create(_filter_known(d, TechniquesConfig)))
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
        from data.tokenizer import sha256_file

        return sha256_file(self.tokenizer)


# ------------------------------------------------------------------------------------- locating
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint step folder, a run directory (newest complete checkpoint), its `checkpoints/`
    folder, or a consolidated folder; verified against its manifest. Raises ConvertError."""
    from launch import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if not p.is_dir():
        raise ConvertError(f"{path} is a file; expected a checkpoint folder (…/checkpoints/step_N) "
                           f"or a run directory")
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


def _quiet_torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # pickling/format errors of a damaged file the manifest did not catch
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConvertError(f"cannot read {path}: {type(exc).__name__}: {first}") from None


def _deepspeed_ready() -> None:
    """DeepSpeed's pickled classes must be importable; select its CPU accelerator quietly."""
    from model.parallel import cpu_compat

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cpu_compat.setup_deepspeed_env()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------- reading
def load(path: str | os.PathLike, optimizer: bool = False, log=None) -> Consolidated:
    """Full weights (and optionally Adam state) from a checkpoint folder or a consolidated folder."""
    folder = resolve_checkpoint(path)
    if is_consolidated(folder):
        return read_consolidated(folder, optimizer=optimizer)
    return read_checkpoint(folder, optimizer=optimizer, log=log)


def read_checkpoint(folder: Path, optimizer: bool = False, log=None) -> Consolidated:
    """Merge the DeepSpeed files of a (verified) Loom checkpoint folder."""
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise ConvertError(f"{meta_path} is missing or unreadable") from None
    if "config" not in meta or "layout" not in meta:
        raise ConvertError(f"{meta_path} has no 'config'/'layout': not written by `loom train`")
    layout = meta["layout"]
    tp, pp, dp, zero = (int(layout[k]) for k in ("tp", "pp", "dp", "zero"))
    run_config = meta["config"]
    cfg = model_config_from_dict(run_config.get("model", {}))
    ds_dir = folder / "ds" / "state"
    if not ds_dir.is_dir():
        raise ConvertError(f"{folder} has no ds/state/ folder (DeepSpeed engine state)")
    _deepspeed_ready()

    per_stage: list[list[dict]] = [[{} for _ in range(tp)] for _ in range(pp)]
    per_stage_opt: list[list[dict]] = [[{} for _ in range(tp)] for _ in range(pp)]
    steps: list[float] = []
    notes: list[str] = []
    for mp_rank in range(tp * pp):
        pp_rank, tp_rank = divmod(mp_rank, tp)
        weights, opt, step, note = _read_model_parallel_rank(ds_dir, mp_rank, dp, zero, optimizer)
        per_stage[pp_rank][tp_rank] = weights
        per_stage_opt[pp_rank][tp_rank] = opt
        if step is not None:
            steps.append(step)
        if note and note not in notes:
            notes.append(note)

    _check_stage_order(per_stage, cfg, pp)
    merged = _merge_layout(per_stage, cfg, tp, pp)
    opt_merged = None
    if optimizer:
        if all(o for stage in per_stage_opt for o in stage):
            opt_merged = {}
            for key in OPTIMIZER_KEYS:
                parts = [[o.get(key, {}) for o in stage] for stage in per_stage_opt]
                opt_merged[key] = _merge_layout(parts, cfg, tp, pp, check_tied=False)
            missing = [n for n in merged if _is_trainable_name(n) and n not in opt_merged["exp_avg"]]
            if missing:
                opt_merged = None
                notes.append(f"optimizer state is incomplete (no state for {missing[0]}); it is left out")
        elif not any(n.startswith("optimizer state") for n in notes):
            notes.append("this checkpoint has no readable optimizer state; it is left out")
    if len(merged.get("embedding.weight", ())) and merged["embedding.weight"].shape[0] < cfg.vocab_size:
        raise ConvertError(f"embedding has {merged['embedding.weight'].shape[0]} rows < model.vocab_size "
                           f"{cfg.vocab_size}")
    _check_core_shapes(merged, cfg, str(folder))
    tokenizer = folder / TOKENIZER_FILE
    return Consolidated(
        weights=merged, run_config=run_config, state=dict(meta.get("state", {})),
        source={"checkpoint": str(folder.resolve()), "layout": dict(layout), "world_size": meta.get("world_size")},
        optimizer=opt_merged, optimizer_step=(max(steps) if (opt_merged is not None and steps) else None),
        tokenizer=tokenizer if tokenizer.is_file() else None, notes=notes)


def _check_stage_order(per_stage: list[list[dict]], cfg, pp: int) -> None:
    """Model-parallel rank = pp_rank * tp + tp_rank (megatron's TP×PP group order): every file of a
    stage must hold exactly that stage's blocks."""
    per = cfg.num_layers // pp
    for pp_rank, shards in enumerate(per_stage):
        want = set(range(pp_rank * per, (pp_rank + 1) * per))
        for shard in shards:
            got = {int(m.group(1)) for n in shard for m in [re.match(r"layers\.(\d+)\.", n)] if m}
            if got != want:
                raise ConvertError(f"pipeline stage {pp_rank} of the checkpoint holds blocks {sorted(got)}, expected "
                                   f"{sorted(want)}: the files do not match the layout in meta.json")


def _is_trainable_name(name: str) -> bool:
    # persistent buffers (SCA's field statistics) have no optimizer state
    return not re.search(r"\.sca\.(mu|var|cnt)$", name)


def _read_model_parallel_rank(ds_dir: Path, mp: int, dp: int, zero: int, optimizer: bool):
    """(weights, {"exp_avg": …, "exp_avg_sq": …}, step, note) of one TP×PP rank, DP merged."""
    if zero == 3:
        model_file = ds_dir / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    else:
        model_file = ds_dir / f"mp_rank_{mp:02d}_model_states.pt"
    if not model_file.is_file():
        raise ConvertError(f"{model_file.name} is missing from {ds_dir} (layout says ZeRO-{zero})")
    states = _quiet_torch_load(model_file)
    module = states["module"]
    buffer_names = set(states.get("buffer_names") or [])
    buffers = {k: v.detach().float() if v.is_floating_point() else v.detach()
               for k, v in module.items() if k in buffer_names and torch.is_tensor(v)}
    if zero == 0:
        return _read_zero0(states, module, buffers, optimizer)
    optim_files = [ds_dir / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt" for d in range(dp)]
    if not optim_files[0].is_file():  # bf16 ZeRO-1/2 runs name them bf16_zero_pp_rank_…
        optim_files = [f.with_name("bf16_" + f.name) for f in optim_files]
    absent = [f.name.replace("bf16_", "") for f in optim_files if not f.is_file()]
    if absent:
        raise ConvertError(f"{absent[0]} is missing from {ds_dir} (layout says DP {dp}, ZeRO-{zero})")
    shards = [_quiet_torch_load(f)["optimizer_state_dict"] for f in optim_files]
    shapes = states.get("param_shapes")
    if not shapes:
        raise ConvertError(f"{model_file.name} has no parameter shapes (not a ZeRO checkpoint?)")
    if zero in (1, 2):
        return _read_zero12(shards, shapes, buffers, optimizer)
    return _read_zero3(shards, shapes, buffers, optimizer)


def _read_zero0(states: dict, module: dict, buffers: dict, optimizer: bool):
    """ZeRO-0: module weights in the working dtype; a bf16 run's DeepSpeed optimizer also keeps
    fp32 masters (`fp32_groups`) in the order of Loom's `build_optimizer` groups."""
    params = {k: v.detach() for k, v in module.items()
              if torch.is_tensor(v) and k not in buffers and not k.endswith("_extra_state")}
    # Loom's build_optimizer: matrices (ndim >= 2) in group 0, vectors in group 1, each in module order
    names = list(params)
    order = [n for n in names if params[n].ndim >= 2] + [n for n in names if params[n].ndim < 2]
    weights = {k: v.float().clone() for k, v in params.items()}
    note = None
    osd = states.get("optimizer")
    masters = osd.get("fp32_groups") if isinstance(osd, dict) else None
    if masters is not None and sum(len(g) for g in masters) == len(order):
        for name, master in zip(order, [t for g in masters for t in g]):
            weights[name] = master.detach().float().reshape(params[name].shape).clone()
    elif any(v.dtype != torch.float32 for v in params.values()):
        note = "ZeRO-0 keeps no fp32 master copy here: weights come from the bf16 working copy"
    weights.update(buffers)
    opt, step = {}, None
    if optimizer:
        torch_state = osd.get("optimizer_state_dict", osd) if isinstance(osd, dict) else None
        opt, step = _zero0_optimizer(torch_state, params, order)
        if not opt:
            note = note or "optimizer state of this ZeRO-0 checkpoint cannot be mapped to names"
    return weights, opt, step, note


def _zero0_optimizer(osd, params: dict, order: list[str]):
    """torch AdamW state of a ZeRO-0 run; torch numbers the parameters in group order."""
    if not isinstance(osd, dict) or "param_groups" not in osd or "state" not in osd:
        return {}, None
    ids = [i for g in osd["param_groups"] for i in g["params"]]
    if len(ids) != len(order):
        return {}, None
    out: dict[str, dict] = {k: {} for k in OPTIMIZER_KEYS}
    step = None
    for pid, name in zip(ids, order):
        st = osd["state"].get(pid)
        if not st:
            continue
        for key in OPTIMIZER_KEYS:
            if key in st:
                out[key][name] = st[key].detach().float().reshape(params[name].shape).clone()
        if "step" in st:
            step = float(st["step"])
    return (out if out["exp_avg"] else {}), step


def _read_zero12(shards: list[dict], shapes: list[dict], buffers: dict, optimizer: bool):
    """ZeRO-1/2: each DP rank's partition of each parameter group is contiguous, and
    `param_slice_mappings` says where each parameter's fragment sits in it."""
    weights: dict[str, torch.Tensor] = {}
    opt: dict[str, dict] = {k: {} for k in OPTIMIZER_KEYS}
    step = None
    for g, group_shapes in enumerate(shapes):
        for key in ("fp32",) + (OPTIMIZER_KEYS if optimizer else ()):
            flats = []
            for shard in shards:
                if key == "fp32":
                    flats.append(shard["single_partition_of_fp32_groups"][g])
                else:
                    st = shard.get("base_optimizer_state", {}).get("state", {}).get(g, {})
                    flats.append(st.get(key))
                    if "step" in st:
                        step = float(st["step"])
            if any(f is None for f in flats):
                continue
            target = weights if key == "fp32" else opt[key]
            for name, shape in group_shapes.items():
                pieces = []
                for shard, flat in zip(shards, flats):
                    address = shard["param_slice_mappings"][g].get(name)
                    if address is not None and address.numel > 0:
                        pieces.append(flat.narrow(0, address.start, address.numel))
                full = torch.cat(pieces) if pieces else torch.empty(0)
                if full.numel() != math.prod(shape):
                    raise ConvertError(f"ZeRO partitions of {name} hold {full.numel()} values, expected "
                                       f"{math.prod(shape)} for shape {tuple(shape)}")
                target[name] = full.float().view(tuple(shape)).clone()
    weights.update(buffers)
    return weights, (opt if optimizer and opt["exp_avg"] else {}), step, None


def _read_zero3(shards: list[dict], shapes: list[dict], buffers: dict, optimizer: bool):
    """ZeRO-3: every parameter is split into `ceil(numel / dp)` elements per DP rank (the last one
    zero-padded), laid end to end in each rank's flat sub-groups in parameter order."""
    world = len(shards)
    names = [(n, tuple(s)) for group in shapes for n, s in group.items()]

    def flat_of(shard: dict, key: str):
        if key == "fp32":
            return torch.cat([t.reshape(-1) for t in shard["fp32_flat_groups"]])
        state = shard.get("optimizer_state_dict", {}).get("state", {})
        if not state or any(key not in state[i] for i in state):
            return None
        return torch.cat([state[i][key].reshape(-1) for i in sorted(state)])

    weights: dict[str, torch.Tensor] = {}
    opt: dict[str, dict] = {k: {} for k in OPTIMIZER_KEYS}
    step = None
    if optimizer:
        state = shards[0].get("optimizer_state_dict", {}).get("state", {})
        if state and "step" in state[sorted(state)[0]]:
            step = float(state[sorted(state)[0]]["step"])
    for key in ("fp32",) + (OPTIMIZER_KEYS if optimizer else ()):
        flats = [flat_of(s, key) for s in shards]
        if any(f is None for f in flats):
            continue
        target = weights if key == "fp32" else opt[key]
        offset = 0
        for name, shape in names:
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            full = torch.cat([f.narrow(0, offset, part) for f in flats])[:numel]
            target[name] = full.float().view(shape).clone()
            offset += part
        if offset > flats[0].numel():
            raise ConvertError("ZeRO-3 partitions are shorter than the parameter shapes say")
    weights.update(buffers)
    return weights, (opt if optimizer and opt["exp_avg"] else {}), step, None


def _merge_layout(per_stage: list[list[dict]], cfg, tp: int, pp: int, check_tied: bool = True) -> dict:
    """TP shards → full tensors; PP stages → one dict; vocabulary rows cut; tied copy dropped."""
    merged: dict[str, torch.Tensor] = {}
    for pp_rank, shards in enumerate(per_stage):
        names = list(shards[0])
        for other in shards[1:]:
            if set(other) != set(names):
                diff = sorted(set(other) ^ set(names))[:3]
                raise ConvertError(f"tensor-parallel ranks of stage {pp_rank} hold different weights: {diff}")
        for name in names:
            dim = partition_dim(name)
            if dim is not None and tp > 1:
                value = torch.cat([s[name] for s in shards], dim=dim)
            else:
                value = shards[0][name]
            if name in merged and name != "output_layer.weight":
                raise ConvertError(f"{name} appears on two pipeline stages")
            merged[name] = value
    for name in VOCAB_WEIGHTS:
        if name in merged and merged[name].shape[0] > cfg.vocab_size:
            merged[name] = merged[name][: cfg.vocab_size].clone()
    if cfg.tie_embeddings and pp > 1 and "output_layer.weight" in merged:
        copy = merged.pop("output_layer.weight")
        if "embedding.weight" in merged and check_tied:
            drift = (copy - merged["embedding.weight"]).abs().max().item()
            if drift > 1e-5 * (merged["embedding.weight"].abs().max().item() + 1e-6):
                raise ConvertError(f"the tied output copy on the last stage differs from the embedding by {drift:.3g}")
    return merged


def _check_core_shapes(weights: dict, cfg, where: str) -> None:
    for name, shape in expected_shapes(cfg).items():
        if name not in weights:
            raise ConvertError(f"{where} has no weight {name}")
        if tuple(weights[name].shape) != shape:
            raise ConvertError(f"{where}: {name} has shape {tuple(weights[name].shape)}, but the config "
                               f"implies {shape}")


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


def write_consolidated(data: Consolidated, folder: Path, kind: str = "consolidate",
                       extra: dict | None = None) -> None:
    """Write `data` into an (empty) folder in the consolidated format, with meta.json and a manifest."""
    from launch import checkpoint as ckpt

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
        "format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "written": time.time(),
        "vocab_rows": "vocab_size (no tensor-parallel padding)",
        "model": data.run_config.get("model", {}), "techniques": data.run_config.get("techniques", {}),
        "config": data.run_config, "state": data.state, "source": data.source,
        "optimizer": {"step": data.optimizer_step, "keys": list(OPTIMIZER_KEYS)} if has_opt else None,
        "tokenizer_sha256": tokenizer_sha, **(extra or {}),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    meta = {"state": data.state, "config": data.run_config, "start_point": True,
            "world_size": None, "layout": None, "source": data.source}
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
    return Consolidated(weights=weights, run_config=run_config, state=dict(info.get("state") or {}),
                        source=dict(info.get("source") or {}), optimizer=opt, optimizer_step=step,
                        tokenizer=tok if tok.is_file() else None)


def consolidate(ckpt: str | os.PathLike, out: str | os.PathLike, optimizer: bool = False, force: bool = False,
                log=print) -> Path:
    """`loom convert consolidate`: checkpoint (any layout) → consolidated folder."""
    data = load(ckpt, optimizer=optimizer, log=log)
    for note in data.notes:
        log(f"note: {note}")
    with output_folder(out, force) as tmp:
        write_consolidated(data, tmp, kind="consolidate")
    n = sum(t.numel() for name, t in data.weights.items() if not is_training_only(name))
    layout = data.source.get("layout") or {}
    log(f"consolidated {len(data.weights)} tensors ({n:,} model parameters, fp32) from "
        f"{data.source.get('checkpoint', ckpt)}"
        + (f" [TP {layout.get('tp')} × PP {layout.get('pp')} × DP {layout.get('dp')}, ZeRO-{layout.get('zero')}]"
           if layout else "")
        + (" with optimizer state" if data.optimizer is not None else "") + f" → {out}")
    return Path(out)
