"""Per-micro-batch state threaded through one pipeline stage's blocks.

Document metadata is derived from the token ids on every stage (every stage reads the same
micro-batch), so no metadata crosses stages. What does cross (`GPTStage.carry_specs`) is SCR's
relevance state ρ and CMR's captured-state bank, alongside the hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from loom.model.technique_plan import TechniquePlan


@dataclass
class ForwardContext:
    tokens: torch.Tensor
    """Input ids [s, b]."""
    pos: torch.Tensor
    """Position inside the document [s, b]."""
    start: torch.Tensor
    """Document-start flags [s, b]."""
    doc: torch.Tensor
    """Document index along the sequence [s, b]."""
    cos: torch.Tensor
    sin: torch.Tensor
    plan: TechniquePlan
    step: int = 0
    training: bool = True
    update_ema: bool = True
    stage_first_point: int = 0
    rho: Optional[torch.Tensor] = None
    bank: list = field(default_factory=list)
    bank_template: Optional[torch.Tensor] = None

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
