"""Shared pieces of the generation tests: a small model whose techniques are all switched on and moved
away from the identity (random technique weights), written as a consolidated folder and exported with
Loom's remote code, and prompts that exercise left padding and document boundaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from loom.model.config import ModelConfig
from loom.techniques.config import TechniquesConfig

EOS = 3
VOCAB = 300
NEW_TOKENS = 256
TOLERANCE = 1e-5
"""Largest |cached − uncached| logit allowed (fp32)."""
FORCED_EOS = (40, 41, 150)
"""Decoding steps at which the tests' chooser emits EOS, so documents also end inside the generation."""
TECHNIQUE_PARTS = ("lcm", "scr", "cmr", "sca", "hcma")


def model_config(**overrides) -> ModelConfig:
    """4 blocks, d = 64, grouped-query attention, a vocabulary padded for TP (300 → 384 rows)."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=96,
        seq_length=512,
        eos_id=EOS,
        pad_vocab_to_multiple_of=128,
    )
    base.update(overrides)
    return ModelConfig(**base)


def techniques(*names: str, variant: bool = False) -> TechniquesConfig:
    """`names` switched on, sized for the small model; `variant` moves every knob off its default
    (placements swapped, SCR decay < 1, two LCM Euler steps, no LCM clamp)."""
    tech = TechniquesConfig()
    for name in names:
        getattr(tech, name).enabled = True
    tech.lcm.K, tech.scr.rank, tech.cmr.rank = 4, 8, 8
    tech.sca.rank, tech.sca.window, tech.sca.warmup_steps = 8, 8, 0
    tech.hcma.K1, tech.hcma.K2, tech.hcma.proj_dim, tech.hcma.knn = 4, 8, 16, 4
    if variant:
        tech.lcm.placement, tech.scr.placement = "post_attn", "post_mlp"
        tech.scr.decay, tech.lcm.n_iter, tech.lcm.clamp = 0.9, 2, False
    return tech


CONFIGS = {
    "baseline": techniques(),
    **{name: techniques(name) for name in TECHNIQUE_PARTS},
    "all five": techniques(*TECHNIQUE_PARTS),
    "all five, other knobs": techniques(*TECHNIQUE_PARTS, variant=True),
}


def prompts(seed: int = 0) -> list[list[int]]:
    """Three prompts of different lengths (a left-padded batch): an EOS inside the first (a document
    boundary in the prompt), the last ends with EOS (the first new token starts a document)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (24, 17, 9)]
    rows[0][10] = EOS
    rows[2][-1] = EOS
    return rows


def activate_techniques(stage: torch.nn.Module, seed: int = 0) -> None:
    """Random technique weights: no technique stays the identity it is at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in stage.named_parameters():
            if any(part in name for part in (".lcm.", ".scr.", ".reweave.", "capture.")):
                param.copy_(0.5 * torch.randn(param.shape, generator=g))


def one_process_grid():
    """megatron-core's TP=1, PP=1 grid on this (forked, one-rank) process; the stage layout."""
    from loom.model.parallel import cpu_compat
    from loom.model.parallel.config import ParallelConfig
    from loom.model.parallel.groups import init_parallel_groups

    cpu_compat.apply()
    return init_parallel_groups(ParallelConfig())


def build_model(cfg: ModelConfig, tech: TechniquesConfig, seed: int = 0) -> torch.nn.Module:
    """The TP=1 stage with active techniques, in eval mode (call inside a one-rank process)."""
    from loom.model.parallel.parallelize import build_stage

    stage = build_stage(cfg, tech, one_process_grid(), seed=seed)
    activate_techniques(stage, seed)
    return stage.eval()


def recording_greedy(vocab: int, eos: int, forced=FORCED_EOS, follow: torch.Tensor | None = None):
    """A greedy chooser that keeps every step's logits and emits EOS at the `forced` steps; with `follow`
    (`[b, steps]` ids) it emits those instead, so a second run sees exactly the first run's sequence."""
    logits: list[torch.Tensor] = []

    def choose(last: torch.Tensor) -> torch.Tensor:
        z = last[:, :vocab].float()
        step = len(logits)
        ids = z.argmax(-1)
        if follow is not None:
            ids = follow[:, step].to(ids.device)
        elif step in forced:
            ids = torch.full_like(ids, eos)
        logits.append(z.clone())
        return ids.double()[:, None]

    return choose, logits


def decode_both(stage, rows: list[list[int]], new_tokens: int, forced=FORCED_EOS) -> dict:
    """Greedy decoding with the cache, then the same sequence recomputed every step without it: the ids
    `[b, steps]` and the `[steps, b, V]` logits of each (the second run follows the first one's tokens,
    so a near-tie cannot send the two runs down different continuations)."""
    from loom.launch.generate.decode import StageRunner, decode

    out = {}
    follow = None
    for mode, use_cache in (("cached", True), ("uncached", False)):
        choose, logits = recording_greedy(stage.cfg.vocab_size, stage.cfg.eos_id, forced, follow)
        decoded = decode(StageRunner(stage, choose), rows, new_tokens, use_cache=use_cache)
        follow = torch.tensor(decoded.ids)
        out[mode] = {"ids": follow, "logits": torch.stack(logits), "seconds": decoded.seconds}
    return out


def greedy_mismatches(ids: torch.Tensor, logits: torch.Tensor, forced=FORCED_EOS) -> list[tuple[int, int]]:
    """(row, step) where `ids` `[b, steps]` is not the greedy choice of `logits` `[steps, b, V]`; a step
    whose best two logits are within `TOLERANCE` is a tie either choice is right for, forced steps are
    not greedy."""
    top = logits.float().topk(2, dim=-1)
    tie = (top.values[..., 0] - top.values[..., 1]) <= TOLERANCE
    wrong = (top.indices[..., 0] != ids.t()) & ~tie
    wrong[[step for step in forced if step < wrong.shape[0]]] = False
    return [(int(b), int(t)) for t, b in wrong.nonzero().tolist()]


def write_model_folder(folder: Path, cfg: ModelConfig, tech: TechniquesConfig, tokenizer: str | None = None) -> Path:
    """Consolidated folder of `build_model(cfg, tech)` (inside a process with the grid up)."""
    from loom.launch.checkpoint.consolidated import Consolidated, write_consolidated
    from loom.launch.config import RunConfig, to_dict
    from loom.model.parallel.consolidate import full_state_dict

    stage = build_model(cfg, tech)
    weights = full_state_dict(stage)
    for name in ("embedding.weight", "output_layer.weight"):  # the consolidated format cuts TP padding
        if name in weights:
            weights[name] = weights[name][: cfg.vocab_size]
    run = RunConfig()
    run.model, run.techniques = cfg, tech
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_consolidated(
        Consolidated(weights=weights, run_config=to_dict(run), tokenizer=Path(tokenizer) if tokenizer else None),
        folder,
    )
    return folder


def write_model_folder_fn(rank, world, folder: str, cfg, tech, tokenizer=None) -> str:
    return str(write_model_folder(Path(folder), cfg, tech, tokenizer))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def smallest_top2_gap(logits: torch.Tensor) -> float:
    """How close greedy decoding came to a tie (a gap below the tolerance could flip a token)."""
    top = logits.float().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()
