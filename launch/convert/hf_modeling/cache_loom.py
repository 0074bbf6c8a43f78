"""The KV cache of Loom's remote code: transformers' `DynamicCache` whose layers also carry the
techniques' inference state, so `generate()` and `past_key_values` reuse work unchanged.

`LoomCacheLayer` is a `DynamicLayer` (keys and values `[b, kv_heads, T, head_dim]`) plus, for its block,
LCM's window of the last K states and SCR's decayed sums; layer 0 also holds the sequences' `Documents`
(where each row's document stands, its next RoPE position, which cached positions are padding). Every
batch operation transformers applies (beam reordering, selecting, repeating rows) reaches them too. The
model installs these layers into the empty cache `generate()` (or the caller) hands it on the first
forward. They cannot be cropped (a window or a sum has no undo), so assisted decoding is refused.

Documents follow the ids exactly as in the full forward: one starts at a row's first real token and
right after every EOS. A left-padding position (attention mask 0) is a document of its own that no real
token attends to and that does not advance the RoPE position.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer


class Documents:
    """Per row: the last real token's document still open (not EOS), the last position's place in its
    document, the next real token's RoPE position, and which cached positions are real."""

    def __init__(self, batch: int, device):
        self.open = torch.zeros(batch, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.real: Optional[torch.Tensor] = None  # [b, T], kept once any row is padded

    def tensors(self) -> list[str]:
        return [name for name in ("open", "pos", "next_position", "real") if getattr(self, name) is not None]

    def advance(self, tokens: torch.Tensor, real: Optional[torch.Tensor], eos_id: Optional[int]):
        """Metadata of the [n, b] ids appended now (real [n, b] bool, None = all real): their document
        positions and starts, RoPE positions, and the real mask (with whether it was all real)."""
        n, b = tokens.shape
        all_real = real is None
        real = torch.ones(n, b, dtype=torch.bool, device=tokens.device) if all_real else real
        steps = torch.arange(n, device=tokens.device)[:, None]
        opens = tokens != eos_id if eos_id is not None else torch.ones_like(real)
        last_real = torch.where(real, steps, torch.full_like(steps, -1)).cummax(0).values
        open_after = torch.where(last_real >= 0, opens.gather(0, last_real.clamp(min=0)), self.open[None])
        start = ~real | ~torch.cat([self.open[None], open_after[:-1]])
        last_start = torch.where(start, steps, torch.full_like(steps, -1)).cummax(0).values
        pos = torch.where(last_start >= 0, steps - last_start, self.pos[None] + 1 + steps)
        positions = (self.next_position[None] + real.long().cumsum(0) - 1).clamp(min=0)
        self.open, self.pos = open_after[-1], pos[-1]
        self.next_position = self.next_position + real.long().sum(0)
        return pos, start, positions, real, all_real

    def mask(self, real: torch.Tensor, all_real: bool, offset: int):
        """(attention mask [b|1, 1, n, offset+n] or None, causal flag) for n new positions after `offset`."""
        n, b = real.shape
        if not all_real and self.real is None:
            self.real = torch.ones(b, offset, dtype=torch.bool, device=real.device)
        if self.real is not None:
            self.real = torch.cat([self.real, real.t()], dim=1)
        elif n == 1 or offset == 0:
            return None, n > 1  # SDPA's causal mask is aligned at the top left: exact on an empty cache
        query = offset + torch.arange(n, device=real.device)[:, None]
        key = torch.arange(offset + n, device=real.device)[None, :]
        allowed = (key <= query)[None]
        if self.real is not None:  # padding is never attended to, except by itself (keeps its row finite)
            allowed = allowed & (self.real[:, None, :] | (key == query)[None])
        return allowed[:, None], False


class LoomCacheLayer(DynamicLayer):
    """One block's keys and values plus its LCM window `lcm` [b, K, d] and SCR sums `scr` [b, r+1]."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lcm: Optional[torch.Tensor] = None
        self.scr: Optional[torch.Tensor] = None
        self.documents: Optional[Documents] = None

    def _rows(self, pick) -> None:
        for name in ("lcm", "scr"):
            if getattr(self, name) is not None:
                setattr(self, name, pick(getattr(self, name)))
        if self.documents is not None:
            for name in self.documents.tensors():
                setattr(self.documents, name, pick(getattr(self.documents, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a Loom cache cannot be cropped: LCM's window and SCR's sums cannot be rolled back")

    def reset(self) -> None:
        super().reset()
        self.lcm = self.scr = self.documents = None


def loom_layers(cache, num_layers: int) -> list[LoomCacheLayer]:
    """The cache's layers as `LoomCacheLayer`s, installed into an empty cache on first use."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError("past_key_values must be a transformers Cache (e.g. DynamicCache())")
    if len(layers) != num_layers or not all(isinstance(layer, LoomCacheLayer) for layer in layers):
        if cache.get_seq_length() > 0:
            raise ValueError("past_key_values holds states this model did not write; start from an empty cache")
        cache.layers = [LoomCacheLayer() for _ in range(num_layers)]
        cache.layer_class_to_replicate = None
    return cache.layers
