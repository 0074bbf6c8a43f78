"""Consolidated weights → any TP×PP×DP×ZeRO layout, and `loom convert reshard`.

A consolidated folder (`launch.convert`) names every tensor as a TP=1, PP=1 model does and keeps
the vocabulary unpadded, so it is layout-free. Loading it into a rank slices each weight for this
rank's TP shard (`partition_dim` rules of `launch.convert`, vocabulary rows zero-padded to this TP
size's padded vocabulary) and takes only this pipeline stage's (globally named) weights:

* `load_consolidated_into_stage(module, weights)` writes into a bare `GPTStage` (before its
  DeepSpeed engine exists; ZeRO-3-partitioned parameters included).
* `load_consolidated_into_engine(sharded, weights, optimizer=…)` writes into a live
  `ShardedStage`: the fp32 master (ZeRO-1/2/3, bf16), the working copy, and optionally Adam's
  `exp_avg` / `exp_avg_sq` / `step`, so a run continues with its optimizer state at a new layout.
* `load_start_point(sharded, folder, …)` does the above from a folder, checks shapes and the
  tokenizer, and returns the folder's trainer state: this is the call `loom train` makes for
  `model.init_from` (weights only, step 0) and for `--resume FOLDER` when FOLDER is a start point.

Technique parameters absent from the weights (a technique switched on for continued pretraining)
keep their fresh initial values, which are the identity (LCM a=0, SCR W_up=0, CMR W_u=0); weights
of a technique the new run switched off are reported and ignored. HCMA's refresh state is not part
of the weights: it is rebuilt at the next refresh step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from loom.launch.checkpoint.consolidated import (
    OPTIMIZER_KEYS,
    VOCAB_WEIGHTS,
    ConvertError,
    is_technique_name,
    load,
    output_folder,
    partition_dim,
    read_consolidated,
    write_consolidated,
)


# ------------------------------------------------------------------------------------- slicing
def _tp_info():
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return 1, 0


def local_slice(name: str, full: torch.Tensor, local_shape: tuple[int, ...], tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's piece of a full (TP=1, unpadded-vocabulary) tensor for a parameter whose
    local shape is `local_shape`."""
    dim = partition_dim(name)
    if dim is None or tp == 1:
        want = tuple(local_shape)
        if name in VOCAB_WEIGHTS:
            full = _fit_vocab(name, full, want[0])
        if tuple(full.shape) != want:
            raise ConvertError(f"{name}: consolidated shape {tuple(full.shape)} does not fit {want}")
        return full
    full_shape = list(local_shape)
    full_shape[dim] *= tp
    if name in VOCAB_WEIGHTS:
        full = _fit_vocab(name, full, full_shape[0])
    if list(full.shape) != full_shape:
        raise ConvertError(
            f"{name}: consolidated shape {tuple(full.shape)} does not fit {tp} × {tuple(local_shape)} (dim {dim})"
        )
    return full.chunk(tp, dim=dim)[tp_rank]


def _fit_vocab(name: str, full: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad (or cut padding from) the vocabulary rows; padding rows never affect the model."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] < rows:
        pad = torch.zeros((rows - full.shape[0],) + tuple(full.shape[1:]), dtype=full.dtype)
        return torch.cat([full, pad])
    return full[:rows]


def _stage_names(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    params = [n for n, _ in module.named_parameters()]
    pset = set(params)
    buffers = [
        n
        for n, v in module.state_dict().items()
        if n not in pset and torch.is_tensor(v) and not n.endswith("_extra_state")
    ]
    return params, buffers


def _all_stage_names(module) -> set[str]:
    """Parameter and persistent-buffer names of every pipeline stage (collective over PP)."""
    from megatron.core import parallel_state as ps

    params, buffers = _stage_names(module)
    mine = set(params) | set(buffers)
    if getattr(module, "tied_across_stages", False):
        mine.discard("output_layer.weight")
    if dist.is_initialized() and ps.model_parallel_is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, sorted(mine), group=group)
        return {n for names in gathered for n in names}
    return mine


def check_names(module, weights: dict, log=None) -> list[str]:
    """Raise if a core weight of the model is missing; return the technique tensors that keep
    their fresh init. The same answer on every rank (collective over the PP group)."""
    wanted = _all_stage_names(module)
    have = set(weights)
    missing = sorted(wanted - have)
    core = [n for n in missing if not is_technique_name(n)]
    if core:
        raise ConvertError(f"the consolidated weights lack {len(core)} weight(s) of this model, e.g. {core[0]}")
    unused = sorted(have - wanted - {"output_layer.weight"})
    if log is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        if missing:
            log(
                f"note: {len(missing)} technique tensor(s) not in the weights start from their identity init "
                f"(e.g. {missing[0]})"
            )
        if unused:
            log(
                f"warning: {len(unused)} tensor(s) of the weights are not used by this model's techniques "
                f"(e.g. {unused[0]}); the network differs from the one that was saved"
            )
    return missing


def _source_tensor(module, name: str, weights: dict) -> Optional[torch.Tensor]:
    if name in weights:
        return weights[name]
    if name == "output_layer.weight" and module.cfg.tie_embeddings and "embedding.weight" in weights:
        return weights["embedding.weight"]
    return None


def _local_shape(param) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_id") else tuple(param.shape)


def _check_model(module, weights: dict) -> None:
    emb = weights.get("embedding.weight")
    if emb is not None and emb.shape[0] < module.cfg.vocab_size:
        raise ConvertError(
            f"the consolidated embedding has {emb.shape[0]} rows but model.vocab_size is {module.cfg.vocab_size}"
        )


@torch.no_grad()
def load_consolidated_into_stage(module: torch.nn.Module, weights: dict[str, torch.Tensor], log=None) -> list[str]:
    """Write full consolidated tensors into this rank's bare stage (TP shard, PP stage).

    Use before the DeepSpeed engine is built (the engine then copies them into its fp32 masters).
    ZeRO-3-partitioned parameters are written through `GatheredParameters` (collective over DP).
    Returns the technique tensors that kept their fresh initial values."""
    tp, tp_rank = _tp_info()
    _check_model(module, weights)
    fresh = check_names(module, weights, log)
    for name, param in module.named_parameters():
        full = _source_tensor(module, name, weights)
        if full is None:
            continue
        value = local_slice(name, full, _local_shape(param), tp, tp_rank)
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value.to(param.dtype))
        else:
            param.data.copy_(value.to(param.dtype))
    _load_buffers(module, weights)
    return fresh


def _load_buffers(module, weights: dict) -> None:
    _, buffers = _stage_names(module)
    for name in buffers:
        if name in weights:
            buf = module.get_buffer(name)
            value = weights[name]
            if tuple(value.shape) != tuple(buf.shape):
                raise ConvertError(f"buffer {name}: consolidated shape {tuple(value.shape)} != {tuple(buf.shape)}")
            buf.copy_(value.to(buf.dtype))


# ------------------------------------------------------------------------------------- engines
def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _step_tensor(step: float, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    device = like.device if like is not None else torch.device("cpu")
    return torch.tensor(float(step), dtype=torch.float32, device=device)


@torch.no_grad()
def load_consolidated_into_engine(
    sharded,
    weights: dict[str, torch.Tensor],
    optimizer: Optional[dict[str, dict[str, torch.Tensor]]] = None,
    optimizer_step: Optional[float] = None,
    log=None,
) -> list[str]:
    """Write full consolidated tensors into a live `ShardedStage` (any ZeRO stage, fp32 or bf16):
    the fp32 master partition, the working copy and, with `optimizer`, Adam's moments and step.

    No collectives besides the name check over the PP group; every rank must call it."""
    engine = sharded.engine
    module = engine.module
    tp, tp_rank = _tp_info()
    _check_model(module, weights)
    fresh = check_names(module, weights, log)
    use_opt = optimizer is not None and optimizer_step is not None
    base = _base_optimizer(engine)
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if use_opt and zero > 0:
        _prepare_flat_states(engine, base, optimizer_step)
    masters = _zero0_masters(engine)
    for name, param in module.named_parameters():
        full = _source_tensor(module, name, weights)
        if full is None:
            continue
        shape = _local_shape(param)
        value = local_slice(name, full, shape, tp, tp_rank).float()
        moments = {}
        if use_opt:
            src_name = (
                name
                if name in optimizer["exp_avg"]
                else ("embedding.weight" if name == "output_layer.weight" else name)
            )
            for key in OPTIMIZER_KEYS:
                t = optimizer.get(key, {}).get(src_name)
                if t is not None:
                    moments[key] = local_slice(name, t, shape, tp, tp_rank).float()
        _write_param(engine, base, param, value, moments, optimizer_step if use_opt else None, masters)
    _load_buffers(module, weights)
    return fresh


def _prepare_flat_states(engine, base, step: float) -> None:
    """ZeRO optimizers and the bf16 optimizer create Adam's state lazily at the first step; create
    it now (zeros, and the step count) on each flat fp32 partition so fragments can be written."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 sub-groups
    if flats is None:
        flats = [flat for group in base.param_groups for flat in group["params"]]
    for flat in flats:
        if flat.numel() == 0:
            continue
        state = base.state[flat]
        for key in OPTIMIZER_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        state["step"] = _step_tensor(step, flat)


def _zero0_masters(engine) -> dict:
    """ZeRO-0 in bf16 runs DeepSpeed's unfused mixed-precision optimizer: an fp32 copy per
    parameter (`fp32_groups`) that Adam updates and copies back. Maps id(working param) → copy."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups") and not hasattr(opt, "fp32_partitioned_groups_flat"):
        return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
    return {}


def _z3_set_partition(opt, param, value: torch.Tensor, key: Optional[str] = None) -> None:
    """This rank's slice of a full value into the ZeRO-3 fp32 master (or Adam state `key`).
    DeepSpeed's own `set_full_hp_param` overruns the last rank's slice when the parameter does not
    divide by the DP size (its partition is zero-padded), so the padding is added here."""
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = opt._get_param_partition_rank(param)
    flat = value.reshape(-1).to(part.dtype)
    start = rank * part.numel()
    piece = flat[start : start + part.numel()]
    part.data.zero_()
    part.data[: piece.numel()].copy_(piece)


def _write_param(engine, base, param, value: torch.Tensor, moments: dict, step: Optional[float], masters: dict) -> None:
    if hasattr(param, "ds_id"):  # ZeRO-3: master + this rank's partition of the working copy
        opt = param._z3_optimizer if hasattr(param, "_z3_optimizer") else None
        if opt is not None:
            _z3_set_partition(opt, param, value)
            for key, t in moments.items():
                _z3_set_partition(opt, param, t, key)
        part = param.ds_tensor
        flat = value.reshape(-1)
        rank = dist.get_rank(group=param.ds_process_group) if param.ds_process_group is not None else 0
        start = rank * part.numel()
        piece = flat[start : start + part.numel()]
        part.data.zero_()
        part.data[: piece.numel()].copy_(piece.to(part.dtype))
        return
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2: this rank's fragment of the flat fp32 partition
        mapping = param._hp_mapping  # None when the parameter lies wholly in another DP rank's partition
        if mapping is not None:
            lp = mapping.lp_fragment_address
            hp = mapping.get_hp_fragment_address()
            flat_group = base.param_groups[mapping.param_group_index]["params"][0]
            flat_group.data.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))
            for key, t in moments.items():
                piece = t.reshape(-1).narrow(0, lp.start, lp.numel)
                base.state[flat_group][key].narrow(0, hp.start, hp.numel).copy_(piece)
        param.data.copy_(value.to(param.dtype))  # every DP rank holds the whole working copy
        return
    # ZeRO-0: torch AdamW works on the module parameters (fp32) or on their fp32 copies (bf16)
    master = masters.get(id(param), param)
    param.data.copy_(value.to(param.dtype))
    if master is not param:
        master.data.copy_(value.to(master.dtype))
    if moments and step is not None:
        state = base.state[master]
        for key, t in moments.items():
            state[key] = t.to(master.dtype).reshape(master.shape).clone()
        state["step"] = _step_tensor(step, master)


# ------------------------------------------------------------------------------------- start points
def is_start_point(folder: str | os.PathLike) -> bool:
    """A consolidated folder (from `loom convert consolidate|from-hf|reshard`), not a DeepSpeed checkpoint."""
    from loom.launch.checkpoint.consolidated import is_consolidated

    p = Path(folder)
    return is_consolidated(p) and not (p / "ds").is_dir()


def check_compatible(model_cfg, saved: dict, where: str, log=print) -> None:
    """The run's model shape must equal the saved one (layout and techniques may differ)."""
    keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "tie_embeddings")
    from loom.launch.checkpoint.consolidated import model_config_from_dict

    s = model_config_from_dict(saved)
    problems = []
    for key in keys:
        a, b = getattr(model_cfg, key), getattr(s, key)
        if key == "num_kv_heads":
            a, b = model_cfg.kv_heads, s.kv_heads
        if key == "ffn_hidden_size":
            a, b = model_cfg.ffn_size, s.ffn_size
        if a != b:
            problems.append(f"model.{key} {a} (run) != {b} ({where})")
    if problems:
        raise ConvertError("the run's model does not match the start point: " + "; ".join(problems))
    for key in ("rope_theta", "norm_eps", "eos_id"):
        if getattr(model_cfg, key) != getattr(s, key) and log is not None:
            log(f"warning: model.{key} is {getattr(model_cfg, key)} in the run but {getattr(s, key)} in {where}")


def load_start_point(
    sharded,
    folder: str | os.PathLike,
    model_cfg=None,
    tokenizer_sha256: Optional[str] = None,
    optimizer: bool = True,
    log=print,
) -> dict:
    """Load a consolidated folder into a live `ShardedStage` at this run's layout.

    `model_cfg` (the run's ModelConfig) and `tokenizer_sha256` (the run's tokenizer) are checked
    against the folder. With `optimizer` and an `optimizer.safetensors` in the folder, Adam's
    state continues; otherwise it starts fresh. Returns the folder's meta: {"state": {...}, ...}
    (trainer state: step, consumed_tokens, …; step 0 for a from-hf start point)."""
    from loom.launch.checkpoint.consolidated import INFO_FILE

    p = Path(folder)
    if not (p / INFO_FILE).is_file():
        raise ConvertError(
            f"{folder} is not a consolidated folder (no {INFO_FILE}); write one with "
            f"`loom convert consolidate` or `loom convert from-hf`"
        )
    data = read_consolidated(p, optimizer=optimizer)
    if model_cfg is not None:
        check_compatible(model_cfg, data.run_config.get("model", {}), str(folder), log=log)
    if tokenizer_sha256 is not None:
        saved = data.tokenizer_sha256()
        if saved is not None and saved != tokenizer_sha256:
            raise ConvertError(
                f"the run's tokenizer differs from the one stored in {folder} (sha256 "
                f"{tokenizer_sha256[:12]} != {saved[:12]}); set data.tokenizer={p / 'tokenizer.model'}"
            )
    load_consolidated_into_engine(sharded, data.weights, data.optimizer, data.optimizer_step, log=log)
    if log is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        what = "weights and optimizer state" if data.optimizer is not None else "weights (optimizer state starts fresh)"
        log(f"loaded {what} from {folder}")
    return {"state": dict(data.state), "source": data.source, "config": data.run_config}


# ------------------------------------------------------------------------------------- reshard
def reshard(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    tensor: Optional[int] = None,
    pipeline: Optional[int] = None,
    zero: Optional[int] = None,
    data_parallel: Optional[int] = None,
    optimizer: bool = True,
    force: bool = False,
    log=print,
) -> Path:
    """`loom convert reshard`: a checkpoint of one layout → a start point for another.

    The output is a consolidated folder with the optimizer state (it is layout-free, so any
    TP×PP×DP×ZeRO can start from it); the target layout only validates divisibility and goes into
    the generated `config.yaml`. Resume with `loom train OUT/config.yaml --resume OUT`."""
    from loom.launch.checkpoint.consolidated import run_config_from_dict
    from loom.launch.config import to_yaml

    data = load(ckpt, optimizer=optimizer, log=log)
    run_cfg = run_config_from_dict(data.run_config)
    p = run_cfg.parallel
    if tensor is not None:
        p.tensor = tensor
    if pipeline is not None:
        p.pipeline = pipeline
    if zero is not None:
        p.zero_stage = zero
    world = None if data_parallel is None else data_parallel * p.tensor * p.pipeline
    problems = p.validate(world) + run_cfg.model.validate(p.tensor, p.pipeline)
    if run_cfg.model.tie_embeddings and p.pipeline > 1 and p.zero_stage == 2:
        problems.append("model.tie_embeddings with parallel.pipeline > 1 needs zero_stage 0 or 1")
    if problems:
        raise ConvertError("the target layout is not valid for this model: " + "; ".join(problems))
    for note in data.notes:
        log(f"note: {note}")
    src_pp = int((data.source.get("layout") or {}).get("pp") or p.pipeline)
    if run_cfg.techniques.cmr.enabled and run_cfg.techniques.cmr.stage_local and src_pp != p.pipeline:
        log(
            f"warning: CMR is stage-local: with PP {p.pipeline} instead of {src_pp} its targets read other sources, "
            f"so the network changes"
        )
    if optimizer and data.optimizer is None:
        log("note: no optimizer state could be read; training from the resharded folder restarts Adam's moments")
    with output_folder(out, force) as tmp:
        target = {"tensor": p.tensor, "pipeline": p.pipeline, "zero_stage": p.zero_stage}
        write_consolidated(data, tmp, kind="reshard", extra={"target_layout": target})
        if data.tokenizer is not None:
            run_cfg.data.tokenizer = str(Path(out).resolve() / "tokenizer.model")
        run_cfg.checkpoint.resume = "none"
        (tmp / "config.yaml").write_text(to_yaml(run_cfg))
    src = data.source.get("layout") or {}
    log(
        f"resharded {data.source.get('checkpoint', ckpt)} (TP {src.get('tp')} × PP {src.get('pp')} × "
        f"DP {src.get('dp')}, ZeRO-{src.get('zero')}) → {out} for TP {p.tensor} × PP {p.pipeline}, "
        f"ZeRO-{p.zero_stage}"
        + (" with optimizer state" if data.optimizer is not None else "")
        + f"\n  continue with: loom train {Path(out) / 'config.yaml'} --resume {out}  (any DP size; the data "
        f"stream restarts)"
    )
    return Path(out)


__all__ = [
    "local_slice",
    "load_consolidated_into_stage",
    "load_consolidated_into_engine",
    "load_start_point",
    "is_start_point",
    "check_compatible",
    "reshard",
]
