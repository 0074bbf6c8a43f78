"""SCR: a relevance-weighted, per-document prefix summary added back through a rank-r map.

docs/techniques.md (SCR): each SCR layer adds ``W_up m_t`` with ``m_t`` the relevance-weighted mean of
``W_down u_k`` over the document prefix ``k <= t``. The relevance ``rho`` recurses across depth
(the paper's "probabilistic layer realignment"), so it is returned and fed to the next SCR layer.
``W_up = 0`` at init makes the module an exact identity.

The prefix sums are a segmented (optionally decayed) scan. A plain ``cumsum`` over the whole
packed sequence followed by subtracting the sum before the document start loses precision to
cancellation late in long sequences, and cannot express decay. ``segmented_cumsum`` therefore
scans blocks of ``C`` tokens with a small masked matmul and carries block totals through the same
scan one level up, so every fp32 sum has at most ``C`` terms and ``decay^k`` is never inverted.
(With TF32 matmuls enabled globally each summand is rounded to TF32 once; that error does not
accumulate along the sequence and stays below the bf16 resolution of the output.)

At inference (docs/techniques.md, SCR "Inference") the prefix sums are an O(1) recurrent state per sequence:
`SCRCarry` holds ``[sum rho v, sum rho]`` (fp32, decayed), taken from the prompt's full forward, and
`SCR.step` adds one token to it, restarting at a document start exactly as the segmented scan does.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.model.precision import at_least_fp32
from loom.techniques import init
from loom.techniques.config import SCRConfig
from loom.techniques.normed_linear import rms_normed_linear
from loom.techniques.selection import parse_relevance_noise

SCAN_BLOCK = 64
"""Tokens per block of the segmented scan."""


def _scan_blocks(x: torch.Tensor, local_doc: torch.Tensor, decay: float) -> torch.Tensor:
    """Within-block segmented decayed scan. x ``[n, C, b, k]``, local_doc ``[n, C, b]`` -> ``[n, C, b, k]``."""
    C = x.shape[1]
    idx = torch.arange(C, device=x.device)
    dist = idx[:, None] - idx[None, :]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    kernel = torch.where(dist >= 0, decay ** dist.clamp(min=0).to(x.dtype), zero)  # decay^(i-u), causal
    docs = local_doc.transpose(1, 2)  # [n, b, C]
    mixing = kernel * (docs[..., :, None] == docs[..., None, :])  # [n, b, C, C]
    return torch.matmul(mixing, x.transpose(1, 2)).transpose(1, 2)


def segmented_cumsum(x: torch.Tensor, start: torch.Tensor, decay: float = 1.0, block: int = SCAN_BLOCK) -> torch.Tensor:
    """``y_t = sum_{k <= t, same document} decay^(t-k) x_k`` along dim 0.

    ``x`` is ``[s, b, k]`` (fp32 expected), ``start`` the ``[s, b]`` document-start flags; the sum
    restarts at every start. ``decay = 1`` is the plain segmented cumsum.
    """
    s, b, k = x.shape
    if s == 0:
        return x.clone()
    C = min(max(block, 2), s)  # blocks of >= 2 tokens so the recursion over blocks terminates
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    xb = F.pad(x, (0, 0, 0, 0, 0, pad)).view(n_blocks, C, b, k)
    starts = torch.cat([start, start.new_zeros(pad, b)]) if pad else start
    local_doc = starts.view(n_blocks, C, b).long().cumsum(1)  # 0 until the block's first start
    y = _scan_blocks(xb, local_doc, decay)
    if n_blocks > 1:
        # State at each block end = that block's tail + decayed state of the previous block end,
        # unless the block contains a start: the same scan over blocks with decay^C.
        ends = segmented_cumsum(y[:, -1], local_doc[:, -1] > 0, decay**C, block)
        carry = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])  # [n, b, k] state entering block
        reach = decay ** torch.arange(1, C + 1, device=x.device, dtype=x.dtype)  # decay to row i of the block
        open_doc = (local_doc == 0).to(x.dtype) * reach[:, None]  # rows still in the previous block's document
        y = y + open_doc[..., None] * carry[:, None]
    return y.reshape(n_blocks * C, b, k)[:s]


class EarlierShards(Protocol):
    """The sequence-parallel group as SCR needs it (`loom.model.parallel.sequence.SequenceShards`)."""

    rank: int

    def earlier_shards(self, per_shard: torch.Tensor) -> torch.Tensor:
        """Every shard's ``[1, …]`` value stacked in shard order, autograd-aware."""


class SCRCarry:
    """One SCR layer's running ``[sum rho v, sum rho]`` per sequence (``[b, r + 1]``, fp32, decayed)."""

    def __init__(self):
        self.sums: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.sums is not None

    def advance(self, x: torch.Tensor, start: torch.Tensor, decay: float) -> torch.Tensor:
        """Add one token's ``[b, r + 1]`` terms; a document start (``start`` ``[b]``) drops the old sums."""
        kept = torch.where(start[:, None], torch.zeros((), dtype=x.dtype, device=x.device), self.sums)
        self.sums = (kept * decay if decay != 1.0 else kept) + x
        return self.sums

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) sequences: ``rows`` indexes the batch dimension."""
        if self.sums is not None:
            self.sums = self.sums.index_select(0, rows.to(self.sums.device))


class SCR(nn.Module):
    """``h_t <- h_t + W_up m_t``; ``forward(h, start, rho_prev)`` returns ``(h_out, rho)``."""

    def __init__(self, hidden_size: int, cfg: SCRConfig):
        super().__init__()
        self.rank, self.gamma, self.decay = cfg.rank, cfg.gamma, cfg.decay
        self.noise_tau = parse_relevance_noise(cfg.relevance_noise)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.relevance = nn.Linear(hidden_size, 1)
        init.zeros_(self.relevance.weight)
        init.zeros_(self.relevance.bias)
        self.down = nn.Linear(hidden_size, cfg.rank, bias=False)
        init.normal_(self.down.weight, std=hidden_size**-0.5)
        self.up = nn.Linear(cfg.rank, hidden_size, bias=False)
        init.zeros_(self.up.weight)
        self._last: dict[str, torch.Tensor] = {}

    def forward(
        self,
        h: torch.Tensor,
        start: torch.Tensor,
        rho_prev: Optional[torch.Tensor] = None,
        carry: Optional[SCRCarry] = None,
        shards: Optional[EarlierShards] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[s, b, d]``, ``start`` ``[s, b]``. With an inference ``carry``: an empty one takes the
        sums at the last position of this (prompt) forward; a filled one continues one token at a time.
        Under sequence parallelism ``h`` is one shard of the sequence and ``shards`` reaches the others."""
        if carry is not None and carry.filled:
            if h.shape[0] != 1:
                raise ValueError(f"SCR continues a cached sequence one token at a time, got {h.shape[0]}")
            out, rho = self.step(h[0], start[0], None if rho_prev is None else rho_prev[0], carry)
            return out[None], rho[None]
        # the relevance logit and the rank-r values read RMSNorm(h) through one fused projection
        heads = rms_normed_linear(h, self.norm, torch.cat([self.relevance.weight, self.down.weight]))
        logit, v = heads[..., 0] + at_least_fp32(self.relevance.bias), heads[..., 1:]  # [s, b], [s, b, r]
        if self.noise_tau is not None and self.training:
            uniform = torch.rand_like(logit).clamp(1e-6, 1.0 - 1e-6)
            logit = (logit + torch.log(uniform) - torch.log1p(-uniform)) / self.noise_tau
        relevance = torch.sigmoid(logit)  # [s, b] fp32
        if rho_prev is None or self.gamma == 0:
            rho = relevance
        else:
            rho = self.gamma * at_least_fp32(rho_prev) + (1.0 - self.gamma) * relevance
        sums = segmented_cumsum(torch.cat([rho[..., None] * v, rho[..., None]], dim=-1), start, self.decay)
        if shards is not None:
            sums = sums + self._carry_from_earlier_shards(sums, start, shards)
        if carry is not None:
            carry.sums = sums[-1].detach().clone()
        summary = sums[..., :-1] / (sums[..., -1:] + 1e-6)
        with torch.no_grad():
            self._last["relevance_mean"] = relevance.mean()
            self._last["rho_mean"] = rho.mean()
        return h + self.up(summary.to(h.dtype)), rho

    def _carry_from_earlier_shards(
        self, sums: torch.Tensor, start: torch.Tensor, shards: EarlierShards
    ) -> torch.Tensor:
        """What the earlier shards add to this shard's prefix sums ``[s, b, r + 1]``: every shard's end state
        (its sums at its last row, which restart at its last document start) and whether it holds a start
        are gathered; the state entering this shard chains them, each decayed over the next shard's rows
        and dropped at a start; it reaches this shard's rows before their first start, decayed to each."""
        s = sums.shape[0]
        ends = torch.cat([sums[-1], start.any(0).to(sums.dtype)[:, None]], dim=-1)  # [b, r + 2]
        every = shards.earlier_shards(ends[None])  # [shards, b, r + 2]
        entering = (
            every[0, :, :-1] * 0
        )  # the first shard's zeros stay in the graph: the gather's backward is collective
        for k in range(shards.rank):
            kept = 1.0 - every[k, :, -1:]  # a start in shard k drops what came before it
            entering = every[k, :, :-1] + kept * (self.decay**s) * entering
        reach = self.decay ** torch.arange(1, s + 1, device=sums.device, dtype=sums.dtype)
        before_first_start = (start.long().cumsum(0) == 0).to(sums.dtype) * reach[:, None]  # [s, b]
        return before_first_start[..., None] * entering

    @torch.no_grad()
    def step(
        self, h: torch.Tensor, start: torch.Tensor, rho_prev: Optional[torch.Tensor], carry: SCRCarry
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per sequence: ``h`` ``[b, d]``, ``start`` ``[b]``, the previous SCR layer's
        ``rho_prev`` ``[b]`` (None at the first); returns ``(h_out [b, d], rho [b])``. O(r d), whatever
        the prefix length; the arithmetic of `forward` with the scan replaced by the carried sums."""
        heads = rms_normed_linear(h, self.norm, torch.cat([self.relevance.weight, self.down.weight]))
        relevance = torch.sigmoid(heads[..., 0] + at_least_fp32(self.relevance.bias))  # no training noise
        if rho_prev is None or self.gamma == 0:
            rho = relevance
        else:
            rho = self.gamma * at_least_fp32(rho_prev) + (1.0 - self.gamma) * relevance
        sums = carry.advance(torch.cat([rho[..., None] * heads[..., 1:], rho[..., None]], dim=-1), start, self.decay)
        summary = sums[..., :-1] / (sums[..., -1:] + 1e-6)
        return h + self.up(summary.to(h.dtype)), rho

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim statistics of the last forward (mean relevance and mean rho)."""
        return dict(self._last)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, gamma={self.gamma}, decay={self.decay}, noise_tau={self.noise_tau}"
