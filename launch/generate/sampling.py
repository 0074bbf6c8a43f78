"""How the next token is picked from the last position's logits: greedy, or sampled with a temperature,
top-k and top-p (nucleus) under a seeded generator, so a run can be repeated token for token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Chooser = Callable[[torch.Tensor], torch.Tensor]
"""Last-position logits `[b, V_local]` → `[b, 1 + extras]` float64: column 0 the next id on every rank."""


@dataclass
class Sampling:
    """Decoding settings of `loom generate`."""

    temperature: float = 0.0
    """Softmax temperature; 0 is greedy decoding (the arg-max, lowest id on ties)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 keeps them all."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches p (nucleus); 1 keeps them all."""
    seed: int = 0
    """Seed of the sampling generator (the same seed and prompts give the same tokens)."""

    def problems(self) -> list[str]:
        out = []
        if not self.temperature >= 0:
            out.append(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            out.append(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"--top-p must be in (0, 1], got {self.top_p}")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`[b, V]` logits with everything outside the top-k and outside the top-p nucleus set to -inf
    (the most likely token always stays)."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the tokens ahead
        drop = before >= top_p
        drop[:, 0] = False
        logits.scatter_(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def sampler(settings: Sampling, vocab_size: int, device: torch.device | str = "cpu") -> Chooser:
    """A `Chooser` over full-vocabulary logits (TP=1; padding columns beyond `vocab_size` are cut)."""
    generator = torch.Generator(device=device).manual_seed(settings.seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        z = logits[:, :vocab_size].float()
        if settings.greedy:
            ids = z.argmax(-1)
        else:
            z = filtered_logits(z / settings.temperature, settings.top_k, settings.top_p)
            ids = torch.multinomial(z.softmax(-1), 1, generator=generator)[:, 0]
        return ids.double()[:, None]

    return choose
