"""Read a DeepSpeed checkpoint of any layout offline into one `Consolidated` set of full tensors.

This is the one place that knows the keys inside DeepSpeed's state files (`layout` knows their
names). It reads the files of every model-parallel rank directly — no process group, no GPU, every
pickle through the allowlist of `unpickle` — and merges:

* ZeRO data-parallel partitions: the fp32 master weights (and, on request, Adam's `exp_avg`,
  `exp_avg_sq` and `step`) of ZeRO-1/2 via each partition's `param_slice_mappings`, of ZeRO-3 via
  its per-parameter `ceil(numel / dp)` partitions. ZeRO-0 has no master copy: its module weights
  (the working dtype) and its plain torch AdamW state are used.
* tensor-parallel shards along each weight's split dimension (`model.parallel.tp_rules`);
  everything else is replicated and taken from TP rank 0.
* pipeline stages: stage modules already use global names (`layers.7.…`), so stages just union.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

from loom.launch.checkpoint.consolidated import OPTIMIZER_KEYS, Consolidated
from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import TOKENIZER, deepspeed_dir, model_states_file, optim_states_files
from loom.launch.checkpoint.meta import read_meta, saved_layout
from loom.launch.checkpoint.unpickle import load_deepspeed_file
from loom.launch.config import model_config_from_saved
from loom.model.parallel.tp_rules import is_vocab_weight, partition_dim
from loom.model.state_dict_adapter import expected_shapes


def _deepspeed_ready() -> None:
    """DeepSpeed's pickled classes must be importable; select its CPU accelerator quietly."""
    from loom.model.parallel import cpu_compat

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cpu_compat.setup_deepspeed_env()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def read_checkpoint(folder: Path, optimizer: bool = False, trust_pickles: bool = False) -> Consolidated:
    """Merge the DeepSpeed files of a (verified) Loom checkpoint folder."""
    meta = read_meta(folder)
    if "config" not in meta:
        raise ConvertError(f"{folder / 'meta.json'} has no 'config': not written by `loom train`")
    layout = saved_layout(meta)
    tp, pp, dp, zero = (layout[k] for k in ("tp", "pp", "dp", "zero"))
    run_config = meta["config"]
    cfg = model_config_from_saved(run_config.get("model"))
    ds_dir = deepspeed_dir(folder)
    if not ds_dir.is_dir():
        raise ConvertError(f"{folder} has no ds/state/ folder (DeepSpeed engine state)")
    _deepspeed_ready()

    def load_file(path: Path):
        return load_deepspeed_file(path, trust_pickles)

    per_stage: list[list[dict]] = [[{} for _ in range(tp)] for _ in range(pp)]
    per_stage_opt: list[list[dict]] = [[{} for _ in range(tp)] for _ in range(pp)]
    steps: list[float] = []
    notes: list[str] = []
    for mp_rank in range(tp * pp):
        pp_rank, tp_rank = divmod(mp_rank, tp)
        weights, opt, step, note = _read_model_parallel_rank(ds_dir, mp_rank, dp, zero, optimizer, load_file)
        per_stage[pp_rank][tp_rank] = weights
        per_stage_opt[pp_rank][tp_rank] = opt
        if step is not None:
            steps.append(step)
        if note and note not in notes:
            notes.append(note)

    _check_stage_order(per_stage, cfg, pp, layout.get("vp", 1))
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
        raise ConvertError(
            f"embedding has {merged['embedding.weight'].shape[0]} rows < model.vocab_size {cfg.vocab_size}"
        )
    _check_core_shapes(merged, cfg, str(folder))
    tokenizer = folder / TOKENIZER
    return Consolidated(
        weights=merged,
        run_config=run_config,
        state=dict(meta.get("state", {})),
        source={"checkpoint": str(folder.resolve()), "layout": dict(layout), "world_size": meta.get("world_size")},
        optimizer=opt_merged,
        optimizer_step=(max(steps) if (opt_merged is not None and steps) else None),
        tokenizer=tokenizer if tokenizer.is_file() else None,
        notes=notes,
    )


def _check_stage_order(per_stage: list[list[dict]], cfg, pp: int, virtual_stages: int = 1) -> None:
    """Model-parallel rank = pp_rank * tp + tp_rank (megatron's TP×PP group order): every file of a
    stage must hold exactly that stage's blocks (those of all its model chunks when interleaved)."""
    from loom.model.gpt import stage_layer_range

    if cfg.num_layers % (pp * virtual_stages):
        raise ConvertError(
            f"meta.json's layout (PP {pp} × {virtual_stages} chunks) does not divide model.num_layers {cfg.num_layers}"
        )
    for pp_rank, shards in enumerate(per_stage):
        want = {
            block
            for chunk in range(virtual_stages)
            for block in stage_layer_range(cfg.num_layers, pp, pp_rank, virtual_stages, chunk)
        }
        for shard in shards:
            got = {int(m.group(1)) for n in shard for m in [re.match(r"layers\.(\d+)\.", n)] if m}
            if got != want:
                raise ConvertError(
                    f"pipeline stage {pp_rank} of the checkpoint holds blocks {sorted(got)}, expected "
                    f"{sorted(want)}: the files do not match the layout in meta.json"
                )


def _is_trainable_name(name: str) -> bool:
    # persistent buffers (SCA's field statistics) have no optimizer state
    return not re.search(r"\.sca\.(mu|var|cnt)$", name)


def _read_model_parallel_rank(ds_dir: Path, mp: int, dp: int, zero: int, optimizer: bool, load_file):
    """(weights, {"exp_avg": …, "exp_avg_sq": …}, step, note) of one TP×PP rank, DP merged."""
    model_file = model_states_file(ds_dir, mp, zero)
    if not model_file.is_file():
        raise ConvertError(f"{model_file.name} is missing from {ds_dir} (layout says ZeRO-{zero})")
    states = load_file(model_file)
    module = states["module"]
    buffer_names = set(states.get("buffer_names") or [])
    buffers = {
        k: v.detach().float() if v.is_floating_point() else v.detach()
        for k, v in module.items()
        if k in buffer_names and torch.is_tensor(v)
    }
    if zero == 0:
        return _read_zero0(states, module, buffers, optimizer)
    optim_files = optim_states_files(ds_dir, mp, dp)
    absent = [f.name.replace("bf16_", "") for f in optim_files if not f.is_file()]
    if absent:
        raise ConvertError(f"{absent[0]} is missing from {ds_dir} (layout says DP {dp}, ZeRO-{zero})")
    shards = [load_file(f)["optimizer_state_dict"] for f in optim_files]
    shapes = states.get("param_shapes")
    if not shapes:
        raise ConvertError(f"{model_file.name} has no parameter shapes (not a ZeRO checkpoint?)")
    if zero in (1, 2):
        return _read_zero12(shards, shapes, buffers, optimizer)
    return _read_zero3(shards, shapes, buffers, optimizer)


def _read_zero0(states: dict, module: dict, buffers: dict, optimizer: bool):
    """ZeRO-0: module weights in the working dtype; a bf16 run's DeepSpeed optimizer also keeps
    fp32 masters (`fp32_groups`) in the order of Loom's `build_optimizer` groups."""
    params = {
        k: v.detach()
        for k, v in module.items()
        if torch.is_tensor(v) and k not in buffers and not k.endswith("_extra_state")
    }
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
                    raise ConvertError(
                        f"ZeRO partitions of {name} hold {full.numel()} values, expected "
                        f"{math.prod(shape)} for shape {tuple(shape)}"
                    )
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
    for name in [n for n in merged if is_vocab_weight(n)]:
        if merged[name].shape[0] > cfg.vocab_size:
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
            raise ConvertError(
                f"{where}: {name} has shape {tuple(weights[name].shape)}, but the config implies {shape}"
            )
