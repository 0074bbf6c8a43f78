"""Inference state of one pipeline stage, so that decoding a token costs O(1) in the prefix length
apart from attention itself.

`InferenceCache` holds, per sequence of a batch, every block's keys and values (`KVCache`) and the techniques'
running state where they sit (docs/techniques.md, each technique's "Inference"): LCM's ring buffer of the last
K states (`LCMWindow`) and SCR's decayed sums (`SCRCarry`). CMR needs nothing in its default mode (its bank is
per token and lives within one forward), SCA is training-only and HCMA is the embedding table.

Document metadata continues across calls exactly as the full forward derives it from the ids: a
document starts at a sequence's first token and right after every EOS, and LCM's positions count from
there. RoPE positions do not restart (attention spans packed documents, as in training).

A batch may be left-padded (`real` False at a padding position). A padding position is a document of
its own, so neither technique carries anything across it; no real token attends to it; it does not
advance the RoPE position, so a row's first real token sits at position 0 as it would alone. It attends
to itself only, which keeps its (unused) output finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from loom.techniques.lcm import LCMWindow
from loom.techniques.scr import SCRCarry


def _grown(buffer: Optional[torch.Tensor], need: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """`buffer` with room for `need` positions along `dim` (doubling, so appending is amortised O(1))."""
    have = 0 if buffer is None else buffer.shape[dim]
    if have >= need:
        return buffer
    shape = list(like.shape)
    shape[dim] = max(need, 2 * have)
    bigger = like.new_zeros(shape)
    if buffer is not None:
        bigger.narrow(dim, 0, have).copy_(buffer)
    return bigger


class KVCache:
    """One block's keys and values `[b, kv_groups, capacity, head_dim]`, written up to the stage's length."""

    def __init__(self, reserve: int = 0):
        self.reserve = reserve
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `[b, g, n, head_dim]` at positions offset..offset+n; return every key and value so far."""
        need = offset + k.shape[2]
        self.keys = _grown(self.keys, max(need, self.reserve), 2, k)
        self.values = _grown(self.values, max(need, self.reserve), 2, v)
        self.keys[:, :, offset:need] = k
        self.values[:, :, offset:need] = v
        return self.keys[:, :, :need], self.values[:, :, :need]

    def select(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, rows.to(self.keys.device))
            self.values = self.values.index_select(0, rows.to(self.values.device))


@dataclass
class BlockCache:
    """Everything one block carries from one decoding call to the next."""

    kv: KVCache
    lcm: Optional[LCMWindow] = None
    scr: Optional[SCRCarry] = None

    def select(self, rows: torch.Tensor) -> None:
        for part in (self.kv, self.lcm, self.scr):
            if part is not None:
                part.select(rows)


@dataclass
class Chunk:
    """Metadata of the `n` tokens one forward adds, `[n, b]` like the hidden states."""

    pos: torch.Tensor
    """Position inside the document."""
    start: torch.Tensor
    """Document-start flags (every padding position is one)."""
    doc: torch.Tensor
    """Document index within the chunk (SCA's grouping; unused at inference)."""
    positions: torch.Tensor
    """RoPE position: real tokens of the row before this one."""
    offset: int
    """Positions already cached: the chunk's keys go to offset..offset+n."""
    attn_mask: Optional[torch.Tensor] = None
    """`[b, 1, n, offset + n]`, True where a query may attend; None when plain causal attention is exact."""
    causal: bool = False
    """With no mask: whether the chunk needs the causal mask (a prompt on an empty cache)."""


@dataclass
class InferenceCache:
    """The decoding state of one pipeline stage for a batch of `batch` sequences."""

    batch: int
    reserve: int = 0
    """Positions to allocate up front (prompt + new tokens), so no buffer grows while decoding."""
    length: int = 0
    """Positions cached so far, padding included."""
    blocks: dict = field(default_factory=dict)
    chunk: Optional[Chunk] = None
    """Metadata of the forward in progress."""
    key_real: Optional[torch.Tensor] = None
    """`[b, capacity]`: which cached positions are real tokens (allocated once a row is padded)."""
    next_position: Optional[torch.Tensor] = None
    """`[b]` RoPE position of each row's next real token."""
    doc_open: Optional[torch.Tensor] = None
    """`[b]`: the row's last real token continues a document (it was not EOS)."""
    doc_pos: Optional[torch.Tensor] = None
    """`[b]` position inside the document of the row's last position."""

    def block(self, index: int, make: Callable[[], BlockCache]) -> BlockCache:
        """Block `index`'s state, created by `make` on first use."""
        state = self.blocks.get(index)
        if state is None:
            state = self.blocks[index] = make()
        return state

    def rope_length(self, n: int) -> int:
        """Length of the RoPE table to ask for before adding `n` positions: a power of two (or the
        reserve), so the table is rebuilt only when it doubles."""
        return max(self.reserve, 1 << (self.length + n - 1).bit_length())

    def begin(self, tokens: torch.Tensor, real: Optional[torch.Tensor], eos_id: Optional[int]) -> Chunk:
        """Document metadata, RoPE positions and the attention mask of the `[n, b]` ids about to be added
        (`real` `[n, b]` bool, None = all real); the bookkeeping moves past them."""
        n, b = tokens.shape
        device = tokens.device
        if self.next_position is None:
            self.next_position = torch.zeros(b, dtype=torch.long, device=device)
            self.doc_open = torch.zeros(b, dtype=torch.bool, device=device)
            self.doc_pos = torch.zeros(b, dtype=torch.long, device=device)
        all_real = real is None
        if all_real:
            real = torch.ones(n, b, dtype=torch.bool, device=device)
        steps = torch.arange(n, device=device)[:, None]
        # a document stays open after a real non-EOS token; padding leaves it as the last real token did
        opens = tokens != eos_id if eos_id is not None else torch.ones_like(real)
        last_real = torch.where(real, steps, torch.full_like(steps, -1)).cummax(0).values
        open_after = torch.where(last_real >= 0, opens.gather(0, last_real.clamp(min=0)), self.doc_open[None])
        open_before = torch.cat([self.doc_open[None], open_after[:-1]])
        start = ~real | ~open_before
        last_start = torch.where(start, steps, torch.full_like(steps, -1)).cummax(0).values
        pos = torch.where(last_start >= 0, steps - last_start, self.doc_pos[None] + 1 + steps)
        positions = (self.next_position[None] + real.long().cumsum(0) - 1).clamp(min=0)
        chunk = Chunk(pos, start, start.long().cumsum(0), positions, self.length)
        self._mask(chunk, real, all_real)
        self.doc_open, self.doc_pos = open_after[-1], pos[-1]
        self.next_position = self.next_position + real.long().sum(0)
        self.chunk = chunk
        return chunk

    def _mask(self, chunk: Chunk, real: torch.Tensor, all_real: bool) -> None:
        n, b = real.shape
        offset, total = self.length, self.length + n
        if not all_real or self.key_real is not None:
            if self.key_real is None:  # the first padded chunk: every position before it was real
                self.key_real = _grown(None, max(total, self.reserve), 1, real.new_ones(b, 1))
                self.key_real[:, :offset] = True
            self.key_real = _grown(self.key_real, max(total, self.reserve), 1, real.new_ones(b, 1))
            self.key_real[:, offset:total] = real.t()
        if self.key_real is None and (n == 1 or offset == 0):
            chunk.causal = n > 1  # SDPA's causal mask is aligned at the top left: exact on an empty cache
            return
        query = offset + torch.arange(n, device=real.device)[:, None]
        key = torch.arange(total, device=real.device)[None, :]
        allowed = (key <= query)[None]  # [1, n, total]
        if self.key_real is not None:
            allowed = allowed & (self.key_real[:, None, :total] | (key == query)[None])
        chunk.attn_mask = allowed[:, None]  # [b or 1, 1, n, total]

    def end(self) -> None:
        """The forward in progress has written its keys: they count as cached."""
        self.length += self.chunk.positions.shape[0]
        self.chunk = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep, repeat or reorder sequences (`rows` indexes the batch), e.g. drop finished ones."""
        for state in self.blocks.values():
            state.select(rows)
        for name in ("key_real", "next_position", "doc_open", "doc_pos"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows.to(value.device)))
        self.batch = int(rows.numel())
