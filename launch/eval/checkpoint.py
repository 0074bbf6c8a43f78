"""Finding a checkpoint for `loom eval` and reading its weights into an evaluation stage.

ZeRO 0-2 checkpoints keep each model-parallel rank's full module weights in
`ds/state/mp_rank_XX_model_states.pt` (`XX = pp_rank·tp + tp_rank`, the same whatever the
data-parallel size), so a stage loads its own file. ZeRO-3 checkpoints only hold each weight cut
into data-parallel partitions, so they are consolidated into full weights first (`launch.convert`,
the code behind `loom convert consolidate`) and sliced for this rank's TP shard and PP stage
(`launch.convert_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def run_config_from_meta(config: dict):
    """The checkpoint's resolved RunConfig (unknown keys from newer/older versions are dropped)."""
    from omegaconf import OmegaConf

    from loom.launch.config import RunConfig, _known_keys

    known = _known_keys(RunConfig)

    def prune(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if path not in known:
                continue
            out[key] = (
                prune(value, path + ".")
                if isinstance(value, dict)
                and value
                and not isinstance(getattr(known[path], "default", None), (dict, list))
                else value
            )
        return out

    schema = OmegaConf.structured(RunConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, prune(config)))


def resolve_checkpoint_dir(path: str) -> Path:
    """A checkpoint folder, or a run directory / its checkpoints folder (then the `latest` one)."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / "meta.json").is_file():
                return cand
    raise FileNotFoundError(f"{path} is not a Loom checkpoint (no meta.json) nor a run directory with one")


def zero_stage_of(meta: dict, default: int = 0) -> int:
    return int(meta.get("layout", {}).get("zero", default))


def load_stage_weights(module: torch.nn.Module, folder: Path, zero_stage: int, mp_rank: int) -> None:
    """Fill this rank's bare stage with the checkpoint's weights; raise if they do not match the model."""
    if zero_stage == 3:
        _load_zero3(module, folder)
    else:
        _load_model_parallel_file(module, folder, mp_rank)


def _load_model_parallel_file(module: torch.nn.Module, folder: Path, mp_rank: int) -> None:
    state_file = folder / "ds" / "state" / f"mp_rank_{mp_rank:02d}_model_states.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: not a complete ZeRO 0-2 checkpoint")
    state = torch.load(state_file, map_location="cpu", weights_only=False)["module"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"{state_file}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )


def _load_zero3(module: torch.nn.Module, folder: Path) -> None:
    """Every rank consolidates on its own: the DP partitions of a stage's weights are spread over
    all files of its model-parallel rank, and reading them needs no process group."""
    from loom.launch.checkpoint.read_deepspeed import read_checkpoint
    from loom.launch.checkpoint.start_point import load_consolidated_into_stage

    weights = read_checkpoint(folder).weights
    # a technique tensor that is absent would silently keep its identity init: evaluate the saved network or nothing
    fresh = load_consolidated_into_stage(module, weights)
    if fresh:
        raise ValueError(
            f"{folder}: the consolidated weights lack {len(fresh)} tensor(s) of the model, e.g. {fresh[0]}"
        )


def reference_embedding_table(folder: Path, vocab_size: int) -> torch.Tensor:
    """The full input embedding (real vocabulary rows) of another checkpoint, fp32."""
    meta = json.loads((folder / "meta.json").read_text())
    if zero_stage_of(meta) == 3:
        from loom.launch.checkpoint.read_deepspeed import read_checkpoint

        return read_checkpoint(folder).weights["embedding.weight"].float()[:vocab_size]
    tp = int(meta.get("layout", {}).get("tp", 1))
    parts = []
    for tp_rank in range(tp):
        sd = torch.load(
            folder / "ds" / "state" / f"mp_rank_{tp_rank:02d}_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
        parts.append(sd["embedding.weight"].float())
    return torch.cat(parts)[:vocab_size]


def initial_embedding_table(cfg, tp: int) -> torch.Tensor:
    """The run's step-0 input embedding, regenerated from its seed."""
    from loom.model.init import initial_value

    shape = (cfg.model.padded_vocab_size(tp), cfg.model.hidden_size)
    return initial_value("embedding.weight", shape, cfg.model, cfg.train.seed)[: cfg.model.vocab_size]


def before_alignment_table(reference: str, cfg, tp: int) -> torch.Tensor:
    """The "before" embedding of the kNN overlap: `reference`'s table, or the run's own initial one."""
    if reference:
        return reference_embedding_table(resolve_checkpoint_dir(reference), cfg.model.vocab_size)
    return initial_embedding_table(cfg, tp)
