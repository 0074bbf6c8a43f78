"""Where everything lives inside a checkpoint folder — Loom's own files and DeepSpeed's — in one place.

    <run>/checkpoints/
        latest                              name of the newest published step folder
        step_00000120/
            ds/state/                       DeepSpeed's engine.save_checkpoint (tag "state"):
                mp_rank_XX_model_states.pt              ZeRO 0-2: module weights of model-parallel rank XX
                zero_pp_rank_0_mp_rank_XX_model_states.pt   ZeRO-3: the same, weights partitioned
                [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt   ZeRO 1-3: DP rank D's optimizer shard
            loom/rank_00003.pt              Loom's per-rank state (loader position, RNG, HCMA)
            meta.json                       step, layout, resolved config
            tokenizer.model                 the run's tokenizer
            MANIFEST.json                   size and sha256 of every file; written last

Model-parallel rank XX = pp_rank · TP + tp_rank (megatron's order), the same at every DP size.
A consolidated folder (`loom convert consolidate`, `from-hf`, `reshard`) holds instead
consolidated.safetensors, optimizer.safetensors (optional), consolidated.json, meta.json, tokenizer.model
and MANIFEST.json.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "MANIFEST.json"
META = "meta.json"
TOKENIZER = "tokenizer.model"
DEEPSPEED = "ds"
DEEPSPEED_TAG = "state"
RANK_STATE_DIR = "loom"

CONSOLIDATED_WEIGHTS = "consolidated.safetensors"
CONSOLIDATED_OPTIMIZER = "optimizer.safetensors"
CONSOLIDATED_INFO = "consolidated.json"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(folder: Path, rank: int) -> Path:
    return folder / RANK_STATE_DIR / f"rank_{rank:05d}.pt"


def deepspeed_dir(folder: Path) -> Path:
    """Where DeepSpeed's files of a checkpoint folder are (engine.save_checkpoint(folder/ds, tag))."""
    return folder / DEEPSPEED / DEEPSPEED_TAG


def model_states_file(ds_dir: Path, mp_rank: int, zero_stage: int) -> Path:
    if zero_stage == 3:
        return ds_dir / f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"
    return ds_dir / f"mp_rank_{mp_rank:02d}_model_states.pt"


def optim_states_files(ds_dir: Path, mp_rank: int, dp: int) -> list[Path]:
    """DP rank d's optimizer shard of one model-parallel rank (ZeRO 1-3); bf16 ZeRO-1/2 runs prefix `bf16_`."""
    files = [ds_dir / f"zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt" for d in range(dp)]
    if files and not files[0].is_file():
        bf16 = [f.with_name("bf16_" + f.name) for f in files]
        if bf16[0].is_file():
            return bf16
    return files


def is_consolidated(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return (p / CONSOLIDATED_INFO).is_file() and (p / CONSOLIDATED_WEIGHTS).is_file()


def is_start_point(folder: str | os.PathLike) -> bool:
    """A consolidated folder (weights to start a run from), not a DeepSpeed checkpoint."""
    p = Path(folder)
    return is_consolidated(p) and not (p / DEEPSPEED).is_dir()
