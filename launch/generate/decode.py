"""The decoding loop every generation in Loom goes through: `loom generate`, `loom eval`'s generation
probes and the end-of-run sample.

`StageRunner` runs this rank's `GPTStage` on new ids with its `InferenceCache` (through the pipeline
when PP > 1: every stage keeps the state of its own blocks) and turns the last position's logits into
the next ids on every rank. `decode` feeds it: the left-padded prompts once, then one token per step,
so a step costs O(1) in the prefix length apart from attention itself. Without the cache
(`use_cache=False`) every step recomputes the whole sequence instead: the reference the cached path is
tested against, and the old cost.

A `context` limit keeps the newest `context` positions as the model's input: while the sequence fits,
the cache serves every step; past it, each step re-runs the last `context` positions from position 0
(the sliding window Loom's uncached generation has always used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from loom.launch.generate.sampling import Chooser
from loom.model.inference import InferenceCache
from loom.model.parallel import comm


@dataclass
class Decoded:
    """What `decode` produced for a batch of prompts."""

    ids: list[list[int]]
    """New tokens per prompt, up to and including EOS when decoding stops there."""
    extras: torch.Tensor
    """`[b, steps, m]` float64: the chooser's extra columns per step (e.g. entropies); m may be 0."""
    seconds: float
    """Wall time of the whole loop, prompt included."""

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


class StageRunner:
    """This rank's stage as a next-token function over a cache: `reset`, then `__call__` with new ids."""

    def __init__(self, module, choose: Chooser, width: int = 1, pp_group=None, dtype=None, device=None):
        self.module, self.choose, self.width = module, choose, width
        self.pp_group = pp_group if pp_group is not None and dist.get_world_size(pp_group) > 1 else None
        first = next(module.parameters())
        self.dtype, self.device = dtype or first.dtype, device or first.device
        self.cache: Optional[InferenceCache] = None

    def reset(self, batch: int, reserve: int = 0) -> None:
        """A fresh cache for `batch` sequences, with room for `reserve` positions."""
        self.cache = InferenceCache(batch, reserve)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, real: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append `ids` `[b, n]` (`real` marks non-padding; None = all) and choose the next ids: `[b, width]`
        float64, the same on every rank."""
        ids = ids.to(self.device)
        mask = None if real is None else real.to(self.device)
        if self.pp_group is None:
            return self.choose(self.module(ids, None, cache=self.cache, attention_mask=mask)[-1])
        from loom.model.parallel.pipeline import forward_only

        def stage_forward(mb, received):
            out = self.module(mb, received, cache=self.cache, attention_mask=mask)
            return self.choose(out[-1]) if self.module.is_last else out

        b, n = ids.shape
        specs = self.module.carry_specs(b, n, self.dtype)
        outs = forward_only(stage_forward, [ids], self.pp_group, specs, self.device)
        decision = outs[0] if outs else torch.zeros(b, self.width, dtype=torch.float64, device=self.device)
        last = dist.get_global_rank(self.pp_group, dist.get_world_size(self.pp_group) - 1)
        comm.broadcast(decision, src=last, group=self.pp_group)
        return decision


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`[b, width]` ids right-aligned, and the `[b, width]` mask of the real ones."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt) :] = True
    return ids, real


def decode(
    runner: StageRunner,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    eos_id: Optional[int] = None,
    context: Optional[int] = None,
    use_cache: bool = True,
) -> Decoded:
    """Continue every prompt by up to `max_new_tokens` tokens (a row stops at `eos_id` if given; the batch
    stops when all rows have). Prompts of different lengths are left-padded."""
    seq, real = left_padded(prompts)
    b = seq.shape[0]
    limit = context or (seq.shape[1] + max_new_tokens)
    new = torch.zeros(b, 0, dtype=torch.long)
    extras = []
    done = torch.zeros(b, dtype=torch.bool)
    start = time.perf_counter()

    def from_scratch():
        runner.reset(b, reserve=min(limit, seq.shape[1] + max_new_tokens))
        return runner(seq[:, -limit:], None if bool(real[:, -limit:].all()) else real[:, -limit:])

    decision = from_scratch()
    for step in range(max_new_tokens):
        next_ids = decision[:, 0].long().cpu()
        new = torch.cat([new, next_ids[:, None]], dim=1)
        extras.append(decision[:, 1:].cpu())
        if eos_id is not None:
            done |= next_ids == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        real = torch.cat([real, torch.ones(b, 1, dtype=torch.bool)], dim=1)
        if use_cache and runner.cache.length < limit:
            decision = runner(next_ids[:, None])
        else:
            decision = from_scratch()
    seconds = time.perf_counter() - start
    ids = []
    for row in new.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        ids.append(row)
    return Decoded(ids, torch.stack(extras, dim=1) if extras else torch.zeros(b, 0, 0), seconds)
