"""A small packed batch shared by the technique tests (Megatron layout, several documents)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from loom.techniques.doc_meta import document_metadata

EOS = 0


@dataclass
class PackedBatch:
    h: torch.Tensor  # [s, b, d] fp32
    tokens: torch.Tensor  # [s, b]
    pos: torch.Tensor
    start: torch.Tensor
    doc: torch.Tensor
    vocab: int


def make_batch(s: int = 128, b: int = 2, d: int = 64, vocab: int = 50, seed: int = 0) -> PackedBatch:
    """Sample 0 holds documents [0, 70) and [70, s); sample 1 holds [0, 30), [30, 31) and [31, s)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (s, b), generator=g)
    tokens[69, 0] = EOS
    tokens[29, 1] = EOS
    tokens[30, 1] = EOS  # a one-token document
    meta = document_metadata(tokens, EOS)
    h = torch.randn(s, b, d, generator=g)
    return PackedBatch(h=h, tokens=tokens, pos=meta.pos, start=meta.start, doc=meta.doc, vocab=vocab)


@pytest.fixture
def batch() -> PackedBatch:
    torch.manual_seed(0)
    return make_batch()
