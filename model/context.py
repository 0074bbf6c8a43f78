"""Per-micro-batch state threaded through one pipeline stage's blocks.

Document metadata is derived from the token ids on every stage (every stage reads the same
micro-batch), so no metadata crosses stages. What does cross (`GPTStage.carry_specs`) is SCR's
relevance state ρ and CMR's captured-state bank, alongside the hidden state. Under sequence
parallelism the per-token fields hold this rank's rows of the sequence (the rows of its residual
stream), and `sequence` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from loom.model.parallel.sequence import SequenceShards
from loom.model.technique_plan import TechniquePlan


@dataclass
class ForwardContext:
    tokens: torch.Tensor
    """Input ids [s, b] (this rank's rows under sequence parallelism)."""
    pos: torch.Tensor
    """Position inside the document [s, b]."""
    start: torch.Tensor
    """Document-start flags [s, b]."""
    doc: torch.Tensor
    """Document index along the sequence [s, b]."""
    cos: torch.Tensor
    """RoPE tables of the full sequence (attention sees every row after megatron's all-gather)."""
    sin: torch.Tensor
    plan: TechniquePlan
    step: int = 0
    training: bool = True
    update_ema: bool = True
    stage_first_point: int = 0
    rho: Optional[torch.Tensor] = None
    bank: list = field(default_factory=list)
    bank_template: Optional[torch.Tensor] = None
    sequence: Optional[SequenceShards] = None
    """Sequence parallelism: which rows of the sequence this rank holds; None when it holds all."""
    full_tokens: Optional[torch.Tensor] = None
    """Input ids of the whole sequence [s, b] under sequence parallelism (SCA's field is per token type)."""
    full_doc: Optional[torch.Tensor] = None
    """Document index of the whole sequence [s, b] under sequence parallelism (SCA's chunks)."""

    @property
    def token_share(self) -> float:
        """The fraction of the sequence's tokens this rank holds: a mean over its rows times this is its
        part of the mean over all rows, so per-token auxiliary losses add up to the unsharded loss."""
        return 1.0 if self.sequence is None else 1.0 / self.sequence.size

    def bank_tensor(self) -> torch.Tensor:
        """[s, b, n_slots, r]; slots not yet captured are zeros (masked out by the reader)."""
        slots = [self.bank_template if t is None else t for t in self.bank]
        return torch.stack(slots, dim=2)

    def readable_slots(self, point: int) -> list[int]:
        """Bank slots the CMR target at h^point reads; every one of them holds a capture (a zero template
        slot would take a share of the softmax as if it were a state)."""
        first = self.stage_first_point if self.plan.cmr_stage_local else None
        slots = self.plan.slots_before(point, first)
        empty = [slot for slot in slots if self.bank[slot] is None]
        if empty:
            raise RuntimeError(f"CMR target h^{point} would read bank slots {empty} that hold no captured state")
        return slots
