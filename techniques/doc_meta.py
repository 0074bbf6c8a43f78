"""Per-token packed-document metadata, so LCM, SCR and SCA never mix packed documents.

Training packs several documents into one sequence. LCM masks its lags with the position inside
the document, SCR restarts its prefix sums at document starts, and SCA groups chunks and
negatives by document index. All three tensors are ``[s, b]`` (Megatron layout) and derive from
one rule: a document starts at position 0 and right after every EOS token.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DocumentMetadata(NamedTuple):
    pos: torch.Tensor
    """Position inside the document, long ``[s, b]``."""
    start: torch.Tensor
    """True at the first token of each document, bool ``[s, b]``."""
    doc: torch.Tensor
    """Document index along the sequence (cumsum of ``start``, first document = 1), long ``[s, b]``."""


def _from_start(start: torch.Tensor) -> DocumentMetadata:
    steps = torch.arange(start.shape[0], device=start.device)[:, None].expand_as(start)
    current_start = torch.where(start, steps, torch.zeros_like(steps)).cummax(0).values
    return DocumentMetadata(pos=steps - current_start, start=start, doc=start.long().cumsum(0))


def document_metadata(tokens: torch.Tensor, eos_id: Optional[int]) -> DocumentMetadata:
    """Metadata of ``[s, b]`` token ids; ``eos_id=None`` treats each row as a single document."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [s, b], got shape {tuple(tokens.shape)}")
    start = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    start[0] = True
    if eos_id is not None and tokens.shape[0] > 1:
        start[1:] = tokens[:-1] == eos_id
    return _from_start(start)
