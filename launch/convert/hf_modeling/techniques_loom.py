"""LCM and SCR for Loom's remote code (`modeling_loom.py`): the full-sequence forward, and the one-token
step generation uses with the state the cache carries (`cache_loom.LoomCacheLayer`).

Self-contained plain PyTorch, the same arithmetic as Loom's `techniques/lcm.py` and `techniques/scr.py`. LCM
keeps the last K states at its placement point (Loom's docs/techniques.md, LCM "Inference"): a new token's
anchor needs nothing older, and the lag mask `pos_t >= j` keeps other documents out, as in the full forward.
SCR keeps its decayed sums `[sum rho v, sum rho]` (the same docs, SCR "Inference"), restarted at a document
start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- LCM
def lag_taps(K: int, beta: float, device=None):
    taps = beta ** torch.arange(K, dtype=torch.float32, device=device)
    return taps / taps.sum()


def causal_anchor(h, pos, taps, block: int = 64):
    """c_t = tap-weighted mean of the previous K positions of the same document (h_t at a start)."""
    s, b, d = h.shape
    K = taps.numel()
    if s == 0:
        return h.clone()
    steps = torch.arange(s, device=h.device)[:, None]
    n_lags = torch.minimum(pos.to(steps.dtype), steps).clamp(0, K)
    tap_mass = F.pad(taps.cumsum(0), (1, 0))[n_lags]
    C = min(block, s)
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    lag = torch.arange(C, device=h.device)[:, None] + K - torch.arange(C + K, device=h.device)[None, :]
    band = torch.where((lag >= 1) & (lag <= K), taps[(lag - 1).clamp(0, K - 1)], torch.zeros((), device=h.device))

    def per_block(x):
        return F.pad(x, (0, 0, 0, pad)).view(n_blocks, C, b).transpose(1, 2)[..., None]

    n_lags_b, mass_b = per_block(n_lags), per_block(tap_mass)
    weights = torch.where(lag <= n_lags_b, band / mass_b.clamp_min(1e-12), torch.zeros((), device=h.device))
    weights = weights + ((lag == 0) & (n_lags_b == 0)).to(weights.dtype)
    windows = F.pad(h, (0, 0, 0, 0, K, pad)).unfold(0, C + K, C)
    anchor = torch.matmul(weights.to(h.dtype), windows.transpose(-1, -2))
    return anchor.transpose(1, 2).reshape(n_blocks * C, b, d)[:s]


class LCM(nn.Module):
    def __init__(self, hidden_size: int, c: dict):
        super().__init__()
        self.K, self.beta, self.a_max = int(c["K"]), float(c["beta"]), float(c["a_max"])
        self.n_iter, self.clamp, self.use_gate = int(c["n_iter"]), bool(c["clamp"]), bool(c["gate"])
        self.alpha = nn.Parameter(torch.zeros(hidden_size))
        if self.use_gate:
            self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
            self.gate_weight = nn.Parameter(torch.zeros(hidden_size))
            self.gate_bias = nn.Parameter(torch.zeros(1))

    def forward(self, h, pos, state=None):
        """h [s, b, d], pos [s, b]. With a cache layer `state`: a prompt fills its `lcm` window (the last K
        states, oldest first), and a filled window continues one token at a time."""
        hf = h.float()
        if state is not None and state.lcm is not None:
            if h.shape[0] != 1:
                raise ValueError("LCM continues a cached sequence one token at a time")
            anchor = self._anchor_from_window(hf[0], pos[0], state)[None]
        else:
            anchor = causal_anchor(hf, pos, lag_taps(self.K, self.beta, h.device))
            if state is not None:  # zeros before the prompt are never read: pos_t <= t
                kept = hf[-self.K :].transpose(0, 1)
                state.lcm = F.pad(kept, (0, 0, self.K - kept.shape[1], 0))
        a = self.a_max * torch.tanh(self.alpha.float())
        if self.clamp:
            a = a.clamp(min=0.0)
        if self.use_gate:
            u = F.rms_norm(hf, self.norm.normalized_shape, self.norm.weight.float(), self.norm.eps).to(h.dtype)
            step = torch.sigmoid(u.float() @ self.gate_weight.float() + self.gate_bias.float())[..., None] * a
        else:
            step = a
        if self.n_iter > 1:
            step = 1.0 - (1.0 - step) ** self.n_iter
        return (hf - step * (hf - anchor)).to(h.dtype)

    def _anchor_from_window(self, hf, pos, state):
        """The anchor of one token per sequence (hf [b, d] at document position pos [b]) from the window of
        the previous K states, which then takes the token in place of its oldest row."""
        n_lags = pos.clamp(0, self.K)  # valid lags 1..n_lags, as in causal_anchor
        valid = torch.arange(1, self.K + 1, device=hf.device)[None, :] <= n_lags[:, None]
        weights = torch.where(valid, lag_taps(self.K, self.beta, hf.device), torch.zeros((), device=hf.device))
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        anchor = torch.einsum("bk,bkd->bd", weights, state.lcm.flip(1))  # row j-1 of the flip is lag j
        state.lcm = torch.cat([state.lcm[:, 1:], hf[:, None]], dim=1)
        return torch.where((n_lags == 0)[:, None], hf, anchor)


# ----------------------------------------------------------------------------- SCR
def _scan_blocks(x, local_doc, decay: float):
    C = x.shape[1]
    idx = torch.arange(C, device=x.device)
    dist = idx[:, None] - idx[None, :]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    kernel = torch.where(dist >= 0, decay ** dist.clamp(min=0).to(x.dtype), zero)
    docs = local_doc.transpose(1, 2)
    mixing = kernel * (docs[..., :, None] == docs[..., None, :])
    return torch.matmul(mixing, x.transpose(1, 2)).transpose(1, 2)


def segmented_cumsum(x, start, decay: float = 1.0, block: int = 64):
    """y_t = sum over k <= t in the same document of decay^(t-k) x_k, along dim 0 of [s, b, k]."""
    s, b, k = x.shape
    if s == 0:
        return x.clone()
    C = min(max(block, 2), s)
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    xb = F.pad(x, (0, 0, 0, 0, 0, pad)).view(n_blocks, C, b, k)
    starts = torch.cat([start, start.new_zeros(pad, b)]) if pad else start
    local_doc = starts.view(n_blocks, C, b).long().cumsum(1)
    y = _scan_blocks(xb, local_doc, decay)
    if n_blocks > 1:
        ends = segmented_cumsum(y[:, -1], local_doc[:, -1] > 0, decay**C, block)
        carry = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
        reach = decay ** torch.arange(1, C + 1, device=x.device, dtype=x.dtype)
        open_doc = (local_doc == 0).to(x.dtype) * reach[:, None]
        y = y + open_doc[..., None] * carry[:, None]
    return y.reshape(n_blocks * C, b, k)[:s]


class SCR(nn.Module):
    def __init__(self, hidden_size: int, c: dict):
        super().__init__()
        self.gamma, self.decay = float(c["gamma"]), float(c["decay"])
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.relevance = nn.Linear(hidden_size, 1)
        self.down = nn.Linear(hidden_size, int(c["rank"]), bias=False)
        self.up = nn.Linear(int(c["rank"]), hidden_size, bias=False)

    def forward(self, h, start, rho_prev=None, state=None):
        """h [s, b, d], start [s, b]. With a cache layer `state`: a prompt leaves its decayed sums in
        `state.scr`, and filled sums continue one token at a time (reset at a document start)."""
        u = F.rms_norm(h.float(), self.norm.normalized_shape, self.norm.weight.float(), self.norm.eps).to(h.dtype)
        relevance = torch.sigmoid(
            F.linear(u.float(), self.relevance.weight.float(), self.relevance.bias.float()).squeeze(-1)
        )
        if rho_prev is None or self.gamma == 0:
            rho = relevance
        else:
            rho = self.gamma * rho_prev.float() + (1.0 - self.gamma) * relevance
        v = self.down(u).float()
        terms = torch.cat([rho[..., None] * v, rho[..., None]], dim=-1)
        if state is not None and state.scr is not None:
            if h.shape[0] != 1:
                raise ValueError("SCR continues a cached sequence one token at a time")
            kept = torch.where(start[0][:, None], torch.zeros((), device=h.device), state.scr)
            state.scr = kept * self.decay + terms[0]
            sums = state.scr[None]
        else:
            sums = segmented_cumsum(terms, start, self.decay)
            if state is not None:
                state.scr = sums[-1]
        summary = sums[..., :-1] / (sums[..., -1:] + 1e-6)
        return h + self.up(summary.to(h.dtype)), rho
