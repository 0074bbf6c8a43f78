"""LCM: one explicit Euler step of a causal contraction toward a per-document context anchor.

The papers leave the "modulation function" unspecified; docs/techniques.md (LCM) makes it the
gradient flow of ``Phi_t = 1/2 ||h_t - c_t||^2_diag(a)`` with ``c_t`` a tap-weighted mean of the
previous ``K`` positions of the same document. ``a = a_max * tanh(alpha)`` starts at 0, so the
module is an exact identity at init and can be switched on for a pretrained checkpoint.

The anchor is a banded causal filter along the sequence. Instead of ``K`` full-tensor shifted
adds (memory-bound, ``K`` passes over the activations) it is evaluated block-wise as batched
matmuls: each block of ``C`` tokens reads its own rows and the previous block's last ``K`` rows
against a ``[C, C + K]`` band of tap weights that already encodes the document mask and the
renormalisation. If TF32 matmuls are
enabled globally, only the tap weights are rounded (bf16-born activations are exact in TF32), an
error below the bf16 resolution of the output.

At inference (docs/techniques.md, LCM "Inference") the anchor of one new token needs only the last ``K``
states: `LCMWindow` keeps them in a ring buffer per sequence, filled by the prompt's full forward, and `LCM.step`
computes one token from it. The lag mask is the same ``pos_t >= j`` rule as the full forward, so the
window needs no reset at a document start: rows of an earlier document are never read.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.model.precision import at_least_fp32
from loom.techniques.aux_loss import attach_aux_loss
from loom.techniques.config import LCMConfig
from loom.techniques.normed_linear import rms_normed_linear

ANCHOR_BLOCK = 64
"""Tokens per block of the anchor matmul; the band matrix costs (C + K) floats per token."""


def lag_taps(K: int, beta: float, device=None) -> torch.Tensor:
    """Normalised fp32 tap weights of lags 1..K: ``beta^(j-1) / sum``."""
    taps = beta ** torch.arange(K, dtype=torch.float32, device=device)
    return taps / taps.sum()


def causal_anchor(h: torch.Tensor, pos: torch.Tensor, taps: torch.Tensor, block: int = ANCHOR_BLOCK) -> torch.Tensor:
    """``c_t = sum_j taps_j h_{t-j} / sum_j taps_j`` over lags ``1 <= j <= K`` with ``pos_t >= j``.

    ``h`` is ``[s, b, d]`` (fp32 expected), ``pos`` the ``[s, b]`` position inside the document.
    A token without valid lags (a document start) is its own anchor, so it is not pulled.
    """
    s, b, d = h.shape
    K = taps.numel()
    if s == 0:
        return h.clone()
    steps = torch.arange(s, device=h.device)[:, None]
    n_lags = torch.minimum(pos.to(steps.dtype), steps).clamp(0, K)  # valid lags are 1..n_lags
    tap_mass = F.pad(taps.cumsum(0), (1, 0))[n_lags]  # sum of the valid taps, 0 if none

    C = min(max(block, K), s)  # K <= C unless s < K: every lag lands in this block or the previous one
    n_blocks = -(-s // C)
    pad = n_blocks * C - s
    # Row i of a block reads column k of [previous block's last K rows | this block's C rows],
    # i.e. lag i + K - k.
    lag = torch.arange(C, device=h.device)[:, None] + K - torch.arange(C + K, device=h.device)[None, :]
    band = torch.where((lag >= 1) & (lag <= K), taps[(lag - 1).clamp(0, K - 1)], torch.zeros((), device=h.device))

    def per_block(x: torch.Tensor) -> torch.Tensor:  # [s, b] -> [n_blocks, b, C, 1]
        return F.pad(x, (0, 0, 0, pad)).view(n_blocks, C, b).transpose(1, 2)[..., None]

    n_lags_b, mass_b = per_block(n_lags), per_block(tap_mass)
    weights = torch.where(lag <= n_lags_b, band / mass_b.clamp_min(1e-12), torch.zeros((), device=h.device))
    weights = weights + ((lag == 0) & (n_lags_b == 0)).to(weights.dtype)  # no history: anchor = h_t
    weights = weights.to(h.dtype)
    # Two products over non-overlapping views instead of one over overlapping windows: the
    # windows' backward (unfold_backward) is a scatter-add that cost more than the matmuls.
    blocks = F.pad(h, (0, 0, 0, 0, 0, pad)).view(n_blocks, C, b, d)
    # [n_blocks, K, b, d]: zeros before block 0 (and above a single block shorter than K)
    tails = F.pad(blocks[:-1, max(C - K, 0) :], (0, 0, 0, 0, max(K - C, 0), 0, 1, 0))
    anchor = torch.einsum("nbik,nkbd->nibd", weights[..., K:], blocks)
    anchor = anchor + torch.einsum("nbik,nkbd->nibd", weights[..., :K], tails)
    return anchor.reshape(n_blocks * C, b, d)[:s]


class LCMWindow:
    """The last ``K`` fp32 states at one LCM layer's placement point, per sequence: a ring buffer
    ``[b, K, d]`` whose slot ``head`` is written next (so lag ``j`` sits in slot ``head - j``)."""

    def __init__(self, K: int, taps: torch.Tensor):
        self.K, self.taps = K, taps
        self.lags = torch.arange(1, K + 1, device=taps.device)
        self.rows: torch.Tensor | None = None
        self.head = 0

    @property
    def filled(self) -> bool:
        return self.rows is not None

    def fill(self, hf: torch.Tensor) -> None:
        """Keep the last ``K`` rows of a prompt's ``[s, b, d]`` states (zeros before its first row: a
        lag that reaches before the prompt is never valid, since ``pos_t <= t``)."""
        s, b, d = hf.shape
        self.rows = hf.new_zeros(b, self.K, d)
        kept = min(s, self.K)
        self.rows[:, self.K - kept :] = hf[s - kept :].transpose(0, 1)
        self.head = 0

    def lagged(self) -> torch.Tensor:
        """``[b, K, d]``: row ``j - 1`` holds ``h_{t-j}`` for the token ``t`` about to be pushed."""
        return self.rows.index_select(1, (self.head - self.lags) % self.K)

    def push(self, hf: torch.Tensor) -> None:
        """Append one token's ``[b, d]`` states, overwriting the oldest."""
        self.rows[:, self.head] = hf
        self.head = (self.head + 1) % self.K

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat, or reorder) sequences: ``rows`` indexes the batch dimension."""
        if self.rows is not None:
            self.rows = self.rows.index_select(0, rows.to(self.rows.device))


class LCM(nn.Module):
    """``h_t <- h_t - g_t a * (h_t - c_t)`` applied to the residual stream ``[s, b, d]``.

    With ``aux_smooth_weight > 0`` the smoothness loss is attached to the output in training
    (``attach_aux_loss``), so callers never handle it.
    """

    def __init__(self, hidden_size: int, cfg: LCMConfig):
        super().__init__()
        self.K, self.beta, self.a_max = cfg.K, cfg.beta, cfg.a_max
        self.n_iter, self.clamp, self.aux_smooth_weight = cfg.n_iter, cfg.clamp, cfg.aux_smooth_weight
        self.alpha = nn.Parameter(torch.zeros(hidden_size))
        self.use_gate = cfg.gate
        if self.use_gate:
            self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
            self.gate_weight = nn.Parameter(torch.zeros(hidden_size))
            self.gate_bias = nn.Parameter(torch.zeros(1))
        self._last: dict[str, torch.Tensor] = {}

    def strength(self) -> torch.Tensor:
        """Per-channel modulation strength ``a`` in fp32."""
        a = self.a_max * torch.tanh(at_least_fp32(self.alpha))
        return a.clamp(min=0.0) if self.clamp else a

    def forward(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        window: LCMWindow | None = None,
        halo: torch.Tensor | None = None,
        loss_share: float = 1.0,
    ) -> torch.Tensor:
        """``h`` ``[s, b, d]``, ``pos`` ``[s, b]``. With an inference ``window``: an empty one is filled
        from this (prompt) forward; a filled one continues one token at a time (`step`).

        Under sequence parallelism ``h`` is one shard of the sequence and ``halo`` ``[K, b, d]`` the
        preceding shard's last ``K`` rows (zeros for the first shard: ``pos`` never lets a lag reach
        before the sequence), and ``loss_share`` this shard's fraction of the tokens, so the smoothness
        losses of the shards add up to the unsharded one."""
        if window is not None and window.filled:
            if h.shape[0] != 1:
                raise ValueError(f"LCM continues a cached sequence one token at a time, got {h.shape[0]}")
            return self.step(h[0], pos[0], window)[None]
        hf = at_least_fp32(h)
        taps = lag_taps(self.K, self.beta, h.device)
        if halo is None:
            anchor = causal_anchor(hf, pos, taps)
        else:  # the halo rows' own anchors are computed and dropped; only the shard's rows are kept
            extended = torch.cat([at_least_fp32(halo), hf])
            anchor = causal_anchor(extended, torch.cat([pos.new_zeros(halo.shape[:2]), pos]), taps)[halo.shape[0] :]
        if window is not None:
            window.fill(hf)
        a = self.strength()
        gate, step = self._step_size(hf, a)
        pull = hf - anchor
        out = (hf - step * pull).to(h.dtype)
        if self.aux_smooth_weight > 0 and self.training and torch.is_grad_enabled():
            smooth = pull.pow(2).sum(-1).mean()
            out = attach_aux_loss(out, self.aux_smooth_weight * loss_share * smooth)
            self._last["smooth_loss"] = smooth.detach()
        with torch.no_grad():
            self._last["gate_mean"] = gate.mean() if gate is not None else torch.ones((), device=h.device)
            self._last["strength_mean"] = a.mean()
            self._last["frac_alpha_negative"] = (self.alpha < 0).float().mean()
        return out

    def _step_size(self, hf: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The gate ``g_t`` (None without one) and the contraction ``1 - (1 - g_t a)^n_iter`` per channel."""
        if self.use_gate:
            gate = torch.sigmoid(rms_normed_linear(hf, self.norm, self.gate_weight[None], self.gate_bias)[..., 0])
            step = gate[..., None] * a
        else:
            gate = None
            step = a
        if self.n_iter > 1:  # n Euler steps with a fixed anchor contract (h - c) by (1 - step)^n
            step = 1.0 - (1.0 - step) ** self.n_iter
        return gate, step

    def new_window(self) -> LCMWindow:
        """An empty inference window for this layer (its tap weights computed once)."""
        return LCMWindow(self.K, lag_taps(self.K, self.beta, self.alpha.device))

    @torch.no_grad()
    def step(self, h: torch.Tensor, pos: torch.Tensor, window: LCMWindow) -> torch.Tensor:
        """One new token per sequence: ``h`` ``[b, d]`` at document position ``pos`` ``[b]``, its anchor
        from the ``window`` of the previous ``K`` states (then pushed into it). O(K d), whatever the
        prefix length; the same arithmetic as `forward` on the token's row."""
        hf = at_least_fp32(h)
        n_lags = pos.clamp(0, self.K)  # valid lags are 1..n_lags, as in causal_anchor
        valid = window.lags[None, :] <= n_lags[:, None]  # [b, K]
        weights = torch.where(valid, window.taps, torch.zeros((), device=h.device))
        weights = (weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)).to(hf.dtype)
        anchor = torch.einsum("bk,bkd->bd", weights, window.lagged())
        anchor = torch.where((n_lags == 0)[:, None], hf, anchor)  # no history: the token is its own anchor
        window.push(hf)
        _, step = self._step_size(hf, self.strength())
        return (hf - step * (hf - anchor)).to(h.dtype)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim statistics of the last forward (gate mean, mean ``a``, dead-channel fraction)."""
        return dict(self._last)

    def extra_repr(self) -> str:
        return (
            f"K={self.K}, beta={self.beta}, a_max={self.a_max}, n_iter={self.n_iter}, "
            f"gate={self.use_gate}, clamp={self.clamp}"
        )
