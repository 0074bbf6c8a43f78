"""Reading a checkpoint's weights into an evaluation stage, and the embedding tables kNN overlap compares.

Any folder `launch.checkpoint.locate` accepts works. A consolidated folder is read from safetensors
only and cut for this rank (`start_point.load_into_stage`). A ZeRO 0-2 checkpoint keeps each
model-parallel rank's full module weights in one DeepSpeed file (`layout.model_states_file`), so a stage
loads its own file; a ZeRO-3 checkpoint holds each weight cut into data-parallel partitions, so it is
consolidated first (`read_deepspeed`) and then cut. Every pickle goes through `unpickle`'s allowlist.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loom.launch.checkpoint.errors import ConvertError
from loom.launch.checkpoint.layout import deepspeed_dir, is_consolidated, model_states_file
from loom.launch.checkpoint.meta import read_meta, saved_layout
from loom.launch.checkpoint.reader import load


def checkpoint_layout(folder: Path, cfg) -> dict[str, int]:
    """tp, pp and zero of the run that wrote `folder` (TP=PP=1 for a layout-free consolidated folder)."""
    if is_consolidated(folder):
        return {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    return saved_layout(read_meta(folder))


def load_stage_weights(module: torch.nn.Module, folder: Path, mp_rank: int, trust_pickles: bool = False) -> None:
    """Fill this rank's bare stage with the checkpoint's weights; raise if they do not match the model."""
    from loom.launch.checkpoint.start_point import load_into_stage

    layout = None if is_consolidated(folder) else saved_layout(read_meta(folder))
    # ZeRO-3 files hold partitions and interleaved files other blocks than a one-chunk stage: consolidate
    if layout is None or layout["zero"] == 3 or layout.get("vp", 1) > 1:
        weights = load(folder, trust_pickles=trust_pickles).weights
        # a technique tensor that is absent would silently keep its identity init: evaluate the saved network or nothing
        fresh = load_into_stage(module, weights, quiet=True)
        if fresh:
            raise ConvertError(f"{folder}: the weights lack {len(fresh)} tensor(s) of the model, e.g. {fresh[0]}")
        return
    state = _module_state(folder, mp_rank, trust_pickles)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConvertError(
            f"{folder}: weights do not match the config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )


def _module_state(folder: Path, mp_rank: int, trust_pickles: bool) -> dict:
    from loom.launch.checkpoint.unpickle import load_deepspeed_file

    state_file = model_states_file(deepspeed_dir(folder), mp_rank, zero_stage=0)
    if not state_file.is_file():
        raise ConvertError(f"{state_file} is missing: not a complete ZeRO 0-2 checkpoint")
    return load_deepspeed_file(state_file, trust_pickles)["module"]


def reference_embedding_table(folder: Path, vocab_size: int, trust_pickles: bool = False) -> torch.Tensor:
    """The full input embedding (real vocabulary rows) of another checkpoint, fp32."""
    if is_consolidated(folder) or saved_layout(read_meta(folder))["zero"] == 3:
        return load(folder, trust_pickles=trust_pickles).weights["embedding.weight"].float()[:vocab_size]
    tp = saved_layout(read_meta(folder))["tp"]
    parts = [_module_state(folder, tp_rank, trust_pickles)["embedding.weight"].float() for tp_rank in range(tp)]
    return torch.cat(parts)[:vocab_size]


def initial_embedding_table(cfg, tp: int) -> torch.Tensor:
    """The run's step-0 input embedding, regenerated from its seed."""
    from loom.model.init import initial_value

    shape = (cfg.model.padded_vocab_size(tp), cfg.model.hidden_size)
    return initial_value("embedding.weight", shape, cfg.model, cfg.train.seed)[: cfg.model.vocab_size]


def before_alignment_table(reference: str, cfg, tp: int) -> tuple[torch.Tensor, str]:
    """The "before" embedding of the kNN overlap and what it is: `reference`'s table (`loom study` passes the
    same seed's baseline, so the overlap is structure kept relative to training without the technique), or
    the run's own step-0 table, whose overlap only measures drift from a random initialisation."""
    from loom.launch.checkpoint.locate import locate_checkpoint

    if reference:
        folder = locate_checkpoint(reference)
        return reference_embedding_table(folder, cfg.model.vocab_size), f"checkpoint {folder.resolve()}"
    return initial_embedding_table(cfg, tp), f"the run's own step-0 table (random init, seed {cfg.train.seed})"
