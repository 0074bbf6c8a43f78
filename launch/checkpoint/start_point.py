"""Start points: consolidated (layout-free) weights loaded into any TP×PP×DP×ZeRO layout.

A consolidated folder names every tensor as a TP=1, PP=1 model does and keeps the vocabulary unpadded.
Loading it into a rank cuts each weight for this rank's TP shard (`model.parallel.tp_rules`) and takes
only this pipeline stage's (globally named) weights:

* `load_into_stage(module, weights)` writes into a bare `GPTStage` (before its DeepSpeed engine
  exists; ZeRO-3-partitioned parameters included) — `loom eval` uses it.
* `load_into_engine(sharded, weights, optimizer=…)` writes into a live `ShardedStage`: the fp32 master
  of every ZeRO stage, the working copy and optionally Adam's moments and step
  (`model.parallel.zero_state.MasterWriter`), so a run continues with its optimizer state at a new layout.
* `load_start_point(sharded, folder, …)` does that from a folder, checks the model shape and the
  tokenizer, and returns the folder's trainer state: the call `loom train` makes for `model.init_from`
  (weights only, step 0) and for `--resume FOLDER` when FOLDER is a start point.

Technique parameters absent from the weights (a technique switched on for continued pretraining) keep
their fresh initial values, which are the identity (LCM a=0, SCR W_up=0, CMR W_u=0); weights of a
technique the new run switched off are reported and ignored. HCMA's refresh state is not part of the
weights: it is rebuilt at the next refresh step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from loom.launch.checkpoint.consolidated import OPTIMIZER_KEYS, read_consolidated
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import CONSOLIDATED_INFO
from loom.model.parallel import comm
from loom.model.parallel.tp_rules import local_slice
from loom.model.parallel.zero_state import MasterWriter, gathered_for_write, local_shape
from loom.model.state_dict_adapter import is_technique_name

log = logging.getLogger(__name__)


def _tp_info() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return 1, 0


def _slice(name: str, full: torch.Tensor, shape: tuple[int, ...], tp: int, tp_rank: int) -> torch.Tensor:
    try:
        return local_slice(name, full, shape, tp, tp_rank)
    except ValueError as exc:
        raise ConvertError(str(exc)) from None


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
        gathered = comm.all_gather_object(sorted(mine), group=ps.get_pipeline_model_parallel_group())
        return {n for names in gathered for n in names}
    return mine


def _is_reporting_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def check_names(module, weights: dict, quiet: bool = False) -> list[str]:
    """Raise if a core weight of the model is missing; return the technique tensors that keep their
    fresh init. The same answer on every rank (collective over the PP group)."""
    wanted = _all_stage_names(module)
    have = set(weights)
    missing = sorted(wanted - have)
    core = [n for n in missing if not is_technique_name(n)]
    if core:
        raise ConvertError(f"the consolidated weights lack {len(core)} weight(s) of this model, e.g. {core[0]}")
    unused = sorted(have - wanted - {"output_layer.weight"})
    if not quiet and _is_reporting_rank():
        if missing:
            log.info(
                f"note: {len(missing)} technique tensor(s) not in the weights start from their identity init "
                f"(e.g. {missing[0]})"
            )
        if unused:
            log.warning(
                f"{len(unused)} tensor(s) of the weights are not used by this model's techniques "
                f"(e.g. {unused[0]}); the network differs from the one that was saved"
            )
    return missing


def _source_tensor(module, name: str, weights: dict) -> torch.Tensor | None:
    if name in weights:
        return weights[name]
    if name == "output_layer.weight" and module.cfg.tie_embeddings and "embedding.weight" in weights:
        return weights["embedding.weight"]
    return None


def _check_vocab(module, weights: dict) -> None:
    emb = weights.get("embedding.weight")
    if emb is not None and emb.shape[0] < module.cfg.vocab_size:
        raise ConvertError(
            f"the consolidated embedding has {emb.shape[0]} rows but model.vocab_size is {module.cfg.vocab_size}"
        )


def _load_buffers(module, weights: dict) -> None:
    _, buffers = _stage_names(module)
    for name in buffers:
        if name in weights:
            buf = module.get_buffer(name)
            value = weights[name]
            if tuple(value.shape) != tuple(buf.shape):
                raise ConvertError(f"buffer {name}: consolidated shape {tuple(value.shape)} != {tuple(buf.shape)}")
            buf.copy_(value.to(buf.dtype))


@torch.no_grad()
def load_into_stage(module: torch.nn.Module, weights: dict[str, torch.Tensor], quiet: bool = False) -> list[str]:
    """Write full consolidated tensors into this rank's bare stage (TP shard, PP stage), before the
    DeepSpeed engine is built (the engine then copies them into its fp32 masters). ZeRO-3-partitioned
    parameters are written through gathered parameters (collective over DP). Returns the technique
    tensors that kept their fresh initial values."""
    tp, tp_rank = _tp_info()
    _check_vocab(module, weights)
    fresh = check_names(module, weights, quiet)
    for name, param in module.named_parameters():
        full = _source_tensor(module, name, weights)
        if full is None:
            continue
        value = _slice(name, full, local_shape(param), tp, tp_rank)
        with gathered_for_write(param):
            param.data.copy_(value.to(param.dtype))
    _load_buffers(module, weights)
    return fresh


@torch.no_grad()
def load_into_engine(
    sharded,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, dict[str, torch.Tensor]] | None = None,
    optimizer_step: float | None = None,
) -> list[str]:
    """Write full consolidated tensors into a live `ShardedStage` (any ZeRO stage, fp32 or bf16): the
    fp32 master partition, the working copy and, with `optimizer`, Adam's moments and step.
    No collectives besides the name check over the PP group; every rank must call it."""
    module = sharded.engine.module
    tp, tp_rank = _tp_info()
    _check_vocab(module, weights)
    fresh = check_names(module, weights)
    use_opt = optimizer is not None and optimizer_step is not None
    writer = MasterWriter(sharded.engine, optimizer_step if use_opt else None)
    for name, param in module.named_parameters():
        full = _source_tensor(module, name, weights)
        if full is None:
            continue
        shape = local_shape(param)
        value = _slice(name, full, shape, tp, tp_rank).float()
        moments = {}
        if use_opt:
            src = (
                name
                if name in optimizer["exp_avg"]
                else ("embedding.weight" if name == "output_layer.weight" else name)
            )
            for key in OPTIMIZER_KEYS:
                t = optimizer.get(key, {}).get(src)
                if t is not None:
                    moments[key] = _slice(name, t, shape, tp, tp_rank).float()
        writer.write(param, value, moments)
    _load_buffers(module, weights)
    return fresh


def check_compatible(model_cfg, saved: dict, where: str) -> None:
    """The run's model shape must equal the saved one (layout and techniques may differ)."""
    from loom.launch.config import model_config_from_saved

    s = model_config_from_saved(saved)
    problems = []
    for key, a, b in (
        ("vocab_size", model_cfg.vocab_size, s.vocab_size),
        ("hidden_size", model_cfg.hidden_size, s.hidden_size),
        ("num_layers", model_cfg.num_layers, s.num_layers),
        ("num_heads", model_cfg.num_heads, s.num_heads),
        ("num_kv_heads", model_cfg.kv_heads, s.kv_heads),
        ("ffn_hidden_size", model_cfg.ffn_size, s.ffn_size),
        ("tie_embeddings", model_cfg.tie_embeddings, s.tie_embeddings),
    ):
        if a != b:
            problems.append(f"model.{key} {a} (run) != {b} ({where})")
    if problems:
        raise ConvertError("the run's model does not match the start point: " + "; ".join(problems))
    for key in ("rope_theta", "norm_eps", "eos_id"):
        if getattr(model_cfg, key) != getattr(s, key) and _is_reporting_rank():
            log.warning(f"model.{key} is {getattr(model_cfg, key)} in the run but {getattr(s, key)} in {where}")


def load_start_point(
    sharded,
    folder: str | os.PathLike,
    model_cfg=None,
    tokenizer_sha256: str | None = None,
    optimizer: bool = True,
) -> dict:
    """Load a consolidated folder into a live `ShardedStage` at this run's layout.

    `model_cfg` (the run's ModelConfig) and `tokenizer_sha256` (the run's tokenizer) are checked
    against the folder. With `optimizer` and an `optimizer.safetensors` in the folder, Adam's state
    continues; otherwise it starts fresh. Returns the folder's meta: {"state": {...}, ...} (trainer
    state: step, consumed_tokens, …; step 0 for a from-hf start point)."""
    p = Path(folder)
    if not (p / CONSOLIDATED_INFO).is_file():
        raise ConvertError(
            f"{folder} is not a consolidated folder (no {CONSOLIDATED_INFO}); write one with "
            f"`loom convert consolidate` or `loom convert from-hf`"
        )
    data = read_consolidated(p, optimizer=optimizer)
    if model_cfg is not None:
        check_compatible(model_cfg, data.run_config.get("model", {}), str(folder))
    if tokenizer_sha256 is not None:
        saved = data.tokenizer_sha256()
        if saved is not None and saved != tokenizer_sha256:
            raise ConvertError(
                f"the run's tokenizer differs from the one stored in {folder} (sha256 "
                f"{tokenizer_sha256[:12]} != {saved[:12]}); set data.tokenizer={p / 'tokenizer.model'}"
            )
    load_into_engine(sharded, data.weights, data.optimizer, data.optimizer_step)
    if _is_reporting_rank():
        what = "weights and optimizer state" if data.optimizer is not None else "weights (optimizer state starts fresh)"
        log.info(f"loaded {what} from {folder}")
    return {"state": dict(data.state), "source": data.source, "config": data.run_config}
